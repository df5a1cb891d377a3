"""A stand-in for ``torch.compile`` that records each call's mode (tests of ``run.compile_mode``)."""

from typing import List

import torch


def record_compile_modes(monkeypatch) -> List[str]:
    """Patch ``torch.compile`` to compile with dynamo's eager backend (Inductor would take minutes on 2 cores)
    and append each call's ``mode`` (``default`` when none) to the returned list."""
    modes: List[str] = []
    real_compile = torch.compile

    def recording_compile(fn, **options):
        modes.append(options.pop("mode", "default"))
        return real_compile(fn, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    return modes
