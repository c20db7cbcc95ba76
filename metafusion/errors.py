"""The project's error types. An ``InputError`` (and its kinds: ConfigError, DataError, RunFolderError,
...) is a problem with what the user asked for or gave: the CLI prints its one-line message and exits
2. Any other exception is a bug in metafusion: the CLI shows its traceback and exits 1."""


class InputError(ValueError):
    """A value, name, file or combination the user gave that cannot be used; the message names it
    and, where there are choices, the valid ones."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder the user pointed to (or a stage needs) does not exist."""
