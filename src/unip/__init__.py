"""UNIP: infrared semantic segmentation with small ViTs pre-trained by hybrid-attention distillation."""

__version__ = "0.1.0"

from unip.errors import CheckpointError, ConfigError, DataError, UnipError

__all__ = ["CheckpointError", "ConfigError", "DataError", "UnipError", "__version__"]
