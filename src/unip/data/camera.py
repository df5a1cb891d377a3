"""Live cameras through OpenCV (``opencv-python``; imported when a camera is opened): UVC thermal cores such as
PureThermal boards with a FLIR Lepton, FLIR Boson, and any UVC camera.

Opening camera ``N`` (:func:`video_capture`, the one place a capture is made: ``cv2.VideoCapture(N)``), unip asks
for 16-bit frames as OpenCV documents it for V4L2 (its ``Y16`` support): ``CAP_PROP_FOURCC`` ``Y16 `` and
``CAP_PROP_CONVERT_RGB`` 0 (raw frames). A camera that gives them (a radiometric Lepton, a Boson in its 16-bit
mode) delivers uint16 ``[H, W]`` counts, which the input mapping stretches per frame (``unip.data.inputs``) or,
with ``tlinear`` (a Lepton's radiometric TLinear output: 0.01 K per count), turns into temperatures. Some backends
hand the Y16 bytes over as uint8 ``[H, W, 2]``: they are read as little-endian 16-bit samples. A camera without
Y16 (or a backend that converts anyway) gives 8-bit frames: CONVERT_RGB is switched back on and the frames are
read as any picture (colour → luma; a palette-coloured video output is named as such once).

A frame that cannot be read ends the stream (the camera was unplugged): the frames before it are complete.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np

from unip.data.inputs import InputMapping, ModelInput, picture_input
from unip.data.video import opencv
from unip.errors import DataError

log = logging.getLogger(__name__)

#: Frame rate assumed when the camera does not say (a Lepton's 8.7 Hz, rounded).
DEFAULT_FPS = 9.0


def video_capture(index: int) -> Any:
    """``cv2.VideoCapture(index)``: where every camera is opened (tests put a generated source here)."""
    return opencv().VideoCapture(index)


class CameraReader:
    """Camera ``index`` opened for reading (module docstring): ``name`` (``camera<index>``), ``bit_depth`` (16 when
    it gives Y16 frames, else 8), ``size`` ``(height, width)``, ``fps`` (what the camera reports, else
    :data:`DEFAULT_FPS`). Raises ``DataError`` when it cannot be opened or gives no frame."""

    def __init__(self, index: int, mapping: Optional[InputMapping] = None) -> None:
        self.index = int(index)
        self.name = f"camera{self.index}"
        self.source = f"camera {self.index}"
        self.mapping = mapping or InputMapping()
        cv2 = opencv()
        self.capture = video_capture(self.index)
        if not self.capture.isOpened():
            self.close()
            raise DataError(f"camera {self.index}: OpenCV cannot open it (not connected, used by another program, or "
                            "no permission to read it, e.g. /dev/video*); list cameras with `v4l2-ctl --list-devices`")
        self.capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"Y16 "))
        self.capture.set(cv2.CAP_PROP_CONVERT_RGB, 0)
        first = self._first_frame(cv2)
        self.bit_depth = 16 if first.dtype == np.uint16 else 8
        self.size: Tuple[int, int] = (int(first.shape[0]), int(first.shape[1]))
        self.fps = float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0) or DEFAULT_FPS
        self._pending: Optional[np.ndarray] = first
        log.info("camera %d: %d x %d, %s frames, %.3g frames/s as the camera says", self.index, self.size[1],
                 self.size[0], "16-bit (Y16)" if self.bit_depth == 16 else "8-bit", self.fps)

    def _first_frame(self, cv2: Any) -> np.ndarray:
        """The first frame as 16-bit counts where the camera gives them; else 8-bit, with conversion back on."""
        ok, raw = self.capture.read()
        frame = self._picture(raw) if ok and raw is not None else None
        if frame is None or frame.dtype != np.uint16:
            self.capture.set(cv2.CAP_PROP_CONVERT_RGB, 1)
            ok, raw = self.capture.read()
            frame = self._picture(raw) if ok and raw is not None else None
        if frame is None:
            self.close()
            raise DataError(f"camera {self.index}: opened, but it gives no frame (another program may hold it)")
        return frame

    def _picture(self, raw: np.ndarray) -> Optional[np.ndarray]:
        """An OpenCV frame as uint16 ``[H, W]``, uint8 ``[H, W]`` or uint8 RGB ``[H, W, 3]``; None for data that
        is none of these (a raw buffer of an unknown format)."""
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[:, :, 0]
        if raw.dtype == np.uint16 and raw.ndim == 2:
            return raw
        if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] == 2 and self._reports_y16():
            return np.ascontiguousarray(raw).view("<u2")[:, :, 0].astype(np.uint16)
        if raw.dtype == np.uint8 and raw.ndim == 2:
            return raw
        if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] in (3, 4):
            return np.ascontiguousarray(raw[:, :, 2::-1])  # BGR(A) → RGB
        return None

    def _reports_y16(self) -> bool:
        fourcc = int(self.capture.get(opencv().CAP_PROP_FOURCC) or 0)
        return fourcc == opencv().VideoWriter_fourcc(*"Y16 ")

    def frames(self, max_frames: Optional[int] = None, stop: Callable[[], bool] = lambda: False
               ) -> Iterator[Tuple[int, ModelInput, float]]:
        """``(index, model input, seconds since the first frame)`` per frame until ``max_frames``, ``stop()`` says
        so (checked before each frame is captured), or the camera gives no more frames."""
        start = time.monotonic()
        index = 0
        while (max_frames is None or index < max_frames) and not stop():
            if self._pending is not None:
                picture, self._pending = self._pending, None
            else:
                ok, raw = self.capture.read()
                picture = self._picture(raw) if ok and raw is not None else None
                if picture is None:
                    log.warning("camera %d: no frame after %d (unplugged?): the stream ends here", self.index, index)
                    return
            yield index, picture_input(picture, self.source, self.mapping, index), time.monotonic() - start
            index += 1

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None
