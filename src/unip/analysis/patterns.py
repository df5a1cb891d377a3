"""Local / hybrid / global attention patterns per layer, and the layer NMI-HAD should distil.

Rule (docs/analysis.md gives the reasoning), applied to a layer's head-averaged NMI and its attention
distance relative to uniform attention (``distance / profile.uniform_distance``):

1. **local** if NMI ≥ ``nmi_local`` or relative distance ≤ ``local_distance``: each query looks at its own
   neighbourhood, so what it attends to depends strongly on where it is;
2. **global** if NMI ≤ ``nmi_global``: every query attends to (nearly) the same tokens;
3. **hybrid** otherwise: queries share a set of global tokens but keep a local part.

``select_distill_layer`` returns the deepest hybrid layer (the paper's choice: MAE-L 18/24, DINO-B 9/12,
iBOT-L 21/24). With no hybrid layer it falls back to the layer whose NMI is closest to the centre of the
hybrid band, the deeper one on ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from unip.analysis.profile import AttentionProfile, LayerStats
from unip.errors import ConfigError

LOCAL, HYBRID, GLOBAL = "local", "hybrid", "global"
PATTERNS = (LOCAL, HYBRID, GLOBAL)


@dataclass(frozen=True)
class PatternThresholds:
    """Thresholds of the classification; defaults to be calibrated on real teachers (see the docs)."""

    nmi_local: float = 0.40
    nmi_global: float = 0.10
    local_distance: float = 0.30

    def __post_init__(self) -> None:
        if not 0.0 <= self.nmi_global < self.nmi_local <= 1.0:
            raise ConfigError(f"NMI thresholds must satisfy 0 <= global ({self.nmi_global}) < local "
                              f"({self.nmi_local}) <= 1; change --nmi-global / --nmi-local")
        if not 0.0 <= self.local_distance < 1.0:
            raise ConfigError(f"the local distance threshold is a fraction of the uniform-attention "
                              f"distance in [0, 1), got {self.local_distance}; change --local-distance")

    @property
    def hybrid_centre(self) -> float:
        """NMI in the middle of the hybrid band."""
        return (self.nmi_local + self.nmi_global) / 2


def classify(nmi: float, relative_distance: float, thresholds: Optional[PatternThresholds] = None) -> str:
    """The pattern (``"local"``, ``"hybrid"`` or ``"global"``) of a layer with these head-averaged values."""
    t = thresholds or PatternThresholds()
    if nmi >= t.nmi_local or relative_distance <= t.local_distance:
        return LOCAL
    if nmi <= t.nmi_global:
        return GLOBAL
    return HYBRID


def classify_profile(profile: AttentionProfile, thresholds: Optional[PatternThresholds] = None) -> List[str]:
    """Classify every layer of ``profile``; stores each in ``LayerStats.pattern`` and returns them in order."""
    reference = profile.uniform_distance
    for stats in profile.layers:
        stats.pattern = classify(stats.value("nmi"), stats.value("distance") / reference, thresholds)
    return [stats.pattern for stats in profile.layers]


@dataclass(frozen=True)
class LayerSelection:
    """The chosen layer (1-based), the model depth, its pattern and why it was chosen."""

    layer: int
    depth: int
    pattern: str
    reason: str

    def __str__(self) -> str:
        return f"layer {self.layer} of {self.depth} ({self.reason})"


def explain_distill_layer(profile: AttentionProfile,
                          thresholds: Optional[PatternThresholds] = None) -> LayerSelection:
    """``select_distill_layer`` with the pattern and the reason; classifies the profile as a side effect."""
    t = thresholds or PatternThresholds()
    if not profile.layers:
        raise ConfigError(f"{profile.source}: the profile has no layers to choose from")
    classify_profile(profile, t)
    hybrid = [s for s in profile.layers if s.pattern == HYBRID]
    if hybrid:
        chosen: LayerStats = hybrid[-1]
        reason = "deepest hybrid layer"
    else:
        chosen = min(reversed(profile.layers), key=lambda s: abs(s.value("nmi") - t.hybrid_centre))
        reason = f"no hybrid layer; NMI closest to the hybrid band centre {t.hybrid_centre:.2f}"
    return LayerSelection(chosen.layer, profile.depth, str(chosen.pattern), reason)


def select_distill_layer(profile: AttentionProfile, thresholds: Optional[PatternThresholds] = None) -> int:
    """The 1-based layer whose attention NMI-HAD should distil: the deepest hybrid layer (fallback above)."""
    return explain_distill_layer(profile, thresholds).layer
