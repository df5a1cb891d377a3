"""NMI-HAD pre-training: the attention-distillation loss (``loss``), the frozen teacher (``teacher``), the
training data (``data``) and the entry point ``unip.distill.train.train(config)`` (``train``)."""

from unip.distill.loss import attention_distill_loss
from unip.distill.teacher import Teacher, drop_register_tokens, fit_to_grid, load_teacher

__all__ = ["Teacher", "attention_distill_loss", "drop_register_tokens", "fit_to_grid", "load_teacher"]
