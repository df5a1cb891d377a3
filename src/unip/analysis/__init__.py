"""Attention-pattern analysis (the paper's §3): metrics, streaming profiles, patterns, layer choice, plots.

``metrics``: ``nmi``, ``attention_distance``, ``attention_entropy`` of post-softmax maps ``[B, H, Q, K]`` →
``[B, H]``. ``profile``: ``profile_model`` streams a model over images into an ``AttentionProfile``.
``patterns``: ``classify_profile`` (local / hybrid / global) and ``select_distill_layer``. ``run.analyze``
is ``unip analyze``. Plots live in ``unip.analysis.plots`` (imported on demand: it loads matplotlib).
"""

from unip.analysis.metrics import (METRICS, attention_distance, attention_entropy, attention_metrics, nmi,
                                   uniform_distance)
from unip.analysis.patterns import (GLOBAL, HYBRID, LOCAL, LayerSelection, PatternThresholds, classify,
                                    classify_profile, explain_distill_layer, select_distill_layer)
from unip.analysis.profile import AttentionProfile, LayerStats, ProfileAccumulator, profile_model

__all__ = [
    "METRICS", "attention_distance", "attention_entropy", "attention_metrics", "nmi", "uniform_distance",
    "GLOBAL", "HYBRID", "LOCAL", "LayerSelection", "PatternThresholds", "classify", "classify_profile",
    "explain_distill_layer", "select_distill_layer",
    "AttentionProfile", "LayerStats", "ProfileAccumulator", "profile_model",
]
