__version__ = "0.1.0"

from .errors import InputError, MissingFileError  # noqa: E402  (the errors a caller may want to catch)

__all__ = ["InputError", "MissingFileError", "__version__"]
