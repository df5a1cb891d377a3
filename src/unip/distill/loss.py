"""The NMI-HAD objective: match the student's last-layer attention distribution to the teacher's.

For each (image, head, query) row of ``[B, H, N, N]`` logits, with ``p = softmax(teacher / T)`` and
``q = softmax(student / T)`` over the keys:

* ``kind="kl"``: ``KL(p ‖ q) = Σ_k p_k (log p_k − log q_k)``,
* ``kind="ce"``: soft cross-entropy ``−Σ_k p_k log q_k`` (= KL + the teacher's entropy, same gradient),

summed over keys and averaged over images, heads and queries. (The release's CE variant reduces over the
head axis instead of the keys; here both variants reduce over keys.) Computed in fp32 from log-softmax,
so rows with very large or ``-inf`` logits give finite values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_KINDS = ("kl", "ce")


def attention_distill_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str = "kl",
                           temperature: float = 1.0) -> Tensor:
    """Distillation loss between attention logits ``[B, H, N, N]`` (pre-softmax; keys on the last axis).

    Returns a 0-d fp32 (or fp64 for fp64 inputs) tensor. The teacher side carries no gradient."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r}: choose one of {', '.join(LOSS_KINDS)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; token grids and head counts must match")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = _log_probs(student_logits, temperature, dtype)
    log_p = _log_probs(teacher_logits.detach(), temperature, dtype)
    p = log_p.exp()
    # p_k = 0 (a masked key or an underflow) contributes nothing; where() also avoids 0 · (−inf) = NaN.
    if kind == "kl":
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    else:
        terms = torch.where(p > 0, -p * log_q, torch.zeros_like(p))
    return terms.sum(dim=-1).mean()


def _log_probs(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """Log-softmax over keys in ``dtype``. ``±inf`` become ``±sqrt(max float)`` first, so that a row of
    ``-inf`` (or one holding ``+inf``) gives a finite distribution; NaN stays NaN (to be detected)."""
    big = torch.finfo(dtype).max ** 0.5
    scaled = (logits.to(dtype) / temperature).nan_to_num(nan=float("nan"), posinf=big, neginf=-big)
    return F.log_softmax(scaled, dim=-1)
