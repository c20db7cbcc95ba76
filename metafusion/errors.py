"""The project's error and warning types. An ``InputError`` (and its kinds: ConfigError, DataError,
RunFolderError, ...) is a problem with what the user asked for or gave: the CLI prints its one-line
message and exits 2. Any other exception is a bug in metafusion: the CLI shows its traceback and exits
1. An ``InputWarning`` is input metafusion can use but the user should hear about."""


class InputError(ValueError):
    """A value, name, file or combination the user gave that cannot be used; the message names it
    and, where there are choices, the valid ones."""


class ConfigError(InputError):
    """A configuration value or key is invalid; the message names it and the valid choices."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder the user pointed to (or a stage needs) does not exist."""


class InputWarning(UserWarning):
    """Something in the user's input that metafusion works around but that may make a result wrong
    (files that could not be read, duplicates, classes seen in meta-training). The CLI prints each as
    one ``warning:`` line; from Python they are ordinary warnings (``warnings.filterwarnings``)."""


def warn(message: str) -> None:
    """Issue an InputWarning attributed to the caller's caller (where the input came in)."""
    import warnings

    warnings.warn(message, InputWarning, stacklevel=3)
