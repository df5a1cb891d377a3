"""Video files through OpenCV (``opencv-python-headless``, imported only when a video is opened).

Frames come out as RGB uint8 ``[H, W, 3]`` like :func:`unip.data.images.read_rgb`: 16-bit frames get the
percentile stretch of :mod:`unip.data.images`, gray frames are repeated to three channels.

Written videos are MP4 (``mp4v``), written to a temporary file and renamed when complete. They end with an
ISO-BMFF ``free`` box holding :data:`VIDEO_MARK` (players skip ``free`` boxes), so that a later run
recognises its own earlier output (``is_our_video``) and never replaces a video it did not write.
"""

from __future__ import annotations

import os
import struct
from types import ModuleType
from typing import Iterator, Optional, Tuple

import numpy as np

from unip.data.images import stretch_to_uint8
from unip.errors import DataError
from unip.optional import require

#: Bytes of the ``free`` box that ends every video unip writes.
VIDEO_MARK = b"written by unip"
_FREE_BOX = struct.pack(">I", 8 + len(VIDEO_MARK)) + b"free" + VIDEO_MARK


def opencv() -> ModuleType:
    """OpenCV (``cv2``), imported on first use; a ``ConfigError`` naming what to install when it is missing."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own messages would bypass our one-line errors
    return require("cv2", "reading and writing videos")


def frame_to_picture(frame: np.ndarray) -> np.ndarray:
    """An OpenCV frame as a picture: 16-bit gray → uint16 ``[H, W]``, 8-bit gray → uint8 ``[H, W]``, colour → RGB
    uint8 ``[H, W, 3]`` (alpha dropped)."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2 and frame.dtype in (np.uint8, np.uint16):
        return frame
    if frame.dtype != np.uint8:
        return frame_to_rgb(frame)
    return np.ascontiguousarray(frame[:, :, 2::-1])


def frame_to_rgb(frame: np.ndarray) -> np.ndarray:
    """An OpenCV frame (BGR or gray; 8 or 16 bits) → RGB uint8 ``[H, W, 3]``."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.dtype != np.uint8:
        frame = stretch_to_uint8(frame)
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    return np.ascontiguousarray(frame[:, :, 2::-1])  # BGR(A) → RGB


class VideoReader:
    """Frames of one video file. Raises ``DataError`` naming the file when OpenCV cannot open it or it
    holds no frame. ``fps``, ``frame_count`` (as the container says; may be approximate) and ``size``
    ``(height, width)`` are known after opening."""

    def __init__(self, path: str) -> None:
        self.path = path
        cv2 = opencv()
        if not os.path.isfile(path):  # a FIFO or device is never opened: OpenCV would wait on it
            raise DataError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such video file'}")
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        ok, first = capture.read() if capture.isOpened() else (False, None)
        if not ok or first is None:
            capture.release()
            raise DataError(f"{path}: OpenCV cannot read a frame of this video (not a video, damaged, or a codec "
                            "it lacks); convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
        self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
        self.frame_count = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 1)
        self.size: Tuple[int, int] = (int(first.shape[0]), int(first.shape[1]))
        capture.release()

    def frames(self, every: int = 1) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(index, RGB uint8 [H, W, 3])`` for frames 0, ``every``, 2·``every``, ... until the video ends
        (a damaged tail ends it early)."""
        for index, frame in self._raw_frames(every):
            yield index, frame_to_rgb(frame)

    def pictures(self, every: int = 1) -> Iterator[Tuple[int, np.ndarray]]:
        """As :meth:`frames`, each frame as it is stored (``frame_to_picture``): 16-bit gray stays 16-bit, for the
        input mapping (``unip.data.inputs.picture_input``)."""
        for index, frame in self._raw_frames(every):
            yield index, frame_to_picture(frame)

    def _raw_frames(self, every: int) -> Iterator[Tuple[int, np.ndarray]]:
        cv2 = opencv()
        capture = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG)
        try:
            index = 0
            while True:
                if index % every:
                    if not capture.grab():
                        return
                else:
                    ok, frame = capture.read()
                    if not ok or frame is None:
                        return
                    yield index, frame
                index += 1
        finally:
            capture.release()


class VideoWriter:
    """Writes RGB uint8 frames of one size to an MP4 file; ``close()`` completes it (rename into place,
    :data:`VIDEO_MARK` appended), ``abort()`` removes the partial file. Use as a context manager.

    An odd height or width is padded by one copy of the last row/column (mp4v stores even sizes only), so the
    video is at most one pixel larger than the frames and no pixel is lost."""

    def __init__(self, path: str, fps: float, size: Tuple[int, int]) -> None:
        cv2 = opencv()
        self.path = path
        folder, name = os.path.split(path)
        self.tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}.mp4")  # OpenCV picks the container by suffix
        os.makedirs(folder or ".", exist_ok=True)
        self.size = (int(size[0]), int(size[1]))
        # mp4v drops the last row/column of an odd size: pad to even with copies of the edge, keeping every pixel
        self._pad = ((0, self.size[0] % 2), (0, self.size[1] % 2), (0, 0))
        even = (self.size[1] + self._pad[1][1], self.size[0] + self._pad[0][1])
        self._writer: Optional[object] = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), even)
        if not self._writer.isOpened():
            self.abort()
            raise DataError(f"{path}: OpenCV cannot write an MP4 video here (no FFmpeg/mp4v support?)")

    def write(self, rgb: np.ndarray) -> None:
        if tuple(rgb.shape[:2]) != self.size:
            raise DataError(f"{self.path}: frame of size {rgb.shape[0]}x{rgb.shape[1]} in a video of "
                            f"{self.size[0]}x{self.size[1]}")
        if self._pad[0][1] or self._pad[1][1]:
            rgb = np.pad(rgb, self._pad, mode="edge")
        self._writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))

    def close(self) -> str:
        self._writer.release()
        self._writer = None
        with open(self.tmp, "ab") as handle:
            handle.write(_FREE_BOX)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def is_our_video(path: str) -> bool:
    """True for a video that :class:`VideoWriter` wrote (it ends with the :data:`VIDEO_MARK` box)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < len(_FREE_BOX):
            return False
        handle.seek(-len(_FREE_BOX), os.SEEK_END)
        return handle.read() == _FREE_BOX
