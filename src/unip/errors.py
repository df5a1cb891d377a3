"""Errors raised by the library.

Library code raises these with a message that names the file (or setting) at fault and says how to fix
it; only ``unip.cli`` turns them into an exit code (2) and one line on stderr.
"""


class UnipError(Exception):
    """Base class of every error UNIP raises on bad input."""


class CheckpointError(UnipError):
    """A checkpoint cannot be read, is unsafe to read, or does not fit the model."""


class DataError(UnipError):
    """A data set, image or label file is missing, unreadable or malformed."""


class ConfigError(UnipError):
    """A configuration value, preset name or command-line option is invalid."""


class ExportError(UnipError):
    """An exported model does not compute what the PyTorch model computes (checked right after export)."""
