"""Errors a user can act on. Each names the file/row/key at fault and what is allowed."""


class LiteSrpoError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(LiteSrpoError):
    """A recipe key is unknown, mistyped or out of range."""


class DataError(LiteSrpoError):
    """A dataset file or row is missing, unreadable or malformed."""


class ModelError(LiteSrpoError):
    """A model path, architecture or adapter does not fit what was asked."""
