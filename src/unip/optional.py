"""Optional dependencies, imported when a feature needs them.

OpenCV (videos), onnx / onnxscript / onnxruntime (ONNX export and benchmarks) are in the ``export`` extra
(``pip install 'unip[export]'``), imagecodecs (the JPEG-LS rasters of FLIR .csq files) in the ``thermal`` extra,
submitit (sweeps on a Slurm cluster) in the ``slurm`` extra, Starlette, uvicorn and python-multipart (``unip serve``)
in the ``serve`` extra; the rest of unip works without them. ``require`` imports one and, when it is missing, raises
a ``ConfigError`` that says which feature needs it and how to install it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from unip.errors import ConfigError

#: Import name → the pip package that provides it.
PACKAGES = {
    "cv2": "opencv-python-headless",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "imagecodecs": "imagecodecs",
    "submitit": "submitit",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "python_multipart": "python-multipart",
}
#: Import name → the extra of unip that installs it (``export`` for the rest).
EXTRAS = {"imagecodecs": "thermal", "submitit": "slurm", "starlette": "serve", "uvicorn": "serve",
          "python_multipart": "serve"}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (one of :data:`PACKAGES`); raises ``ConfigError`` naming ``feature`` when it is not
    installed."""
    if module == "cv2":  # OpenCV's own log lines would break the one-line errors (a video it cannot open)
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = PACKAGES.get(module, module)
        raise ConfigError(f"{feature} needs the Python package {package} ({err}); install it with "
                          f"pip install {package} or pip install 'unip[{EXTRAS.get(module, 'export')}]'") from None
