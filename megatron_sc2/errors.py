"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input or an impossible setting; the message names what is wrong."""


class ConfigError(UserError):
    """A configuration that cannot work (names the setting at fault)."""


class DataError(UserError):
    """Malformed or missing input data (names the file and, where known, the line)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not match the model."""
