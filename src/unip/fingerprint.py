"""Content fingerprints that survive moving and renaming files.

A resumed run compares what it trains on with what wrote its state; comparing paths refuses a data set copied
to another disk or a teacher file renamed, and accepts a different file put at the old path. These digests
compare content instead: the weights themselves (whatever the file format) and a data set's file list relative
to its own folder. They detect a different teacher or data set, not deliberate collisions.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping, Sequence

import torch

#: values hashed per tensor: an evenly strided sample, so a ViT-L costs milliseconds, not a full read
SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(state: Mapping[str, torch.Tensor], samples: int = SAMPLES_PER_TENSOR) -> str:
    """A 16-hex-digit digest of a state dict: every name and shape, and up to ``samples`` evenly strided values of
    each tensor (as float32). Equal weights give equal digests whatever file or dtype they were read from only
    when the values are equal; any re-trained or other checkpoint differs."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.reshape(-1)
        if flat.numel():
            stride = max(1, flat.numel() // samples)
            digest.update(flat[::stride][:samples].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def listing_fingerprint(paths: Sequence[str]) -> str:
    """A 16-hex-digit digest of a file list in its order (the order decides which image an index reads), each
    path taken relative to the list's common folder, so the same files moved elsewhere give the same digest."""
    absolute = [os.path.abspath(str(path)) for path in paths]
    if not absolute:
        return hashlib.blake2b(b"", digest_size=8).hexdigest()
    common = os.path.commonpath(absolute) if len(absolute) > 1 else os.path.dirname(absolute[0])
    digest = hashlib.blake2b(digest_size=8)
    for path in absolute:
        digest.update(os.path.relpath(path, common).replace(os.sep, "/").encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()
