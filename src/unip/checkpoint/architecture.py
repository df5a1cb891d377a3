"""Plausibility of the ViT a file describes, checked before anything is allocated, and the architecture
read off weight shapes when a file names none."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from unip.checkpoint.reading import _preview, normalize_keys
from unip.engine.config import Rule, flag, integer, number, text
from unip.errors import CheckpointError
from unip.models.pos_embed import is_square_grid
from unip.models.presets import VIT_SIZES
from unip.models.vit import ACT_LAYERS, MLP_LAYERS, VARIANT_DEFAULTS, VisionTransformer, mlp_ratio_of


#: Bounds of a plausible ViT described by a file (metadata, release args or key names); the largest released
#: ViTs lie far inside them. Checked before anything is allocated (``check_architecture``).
MAX_DEPTH, MAX_WIDTH, MAX_PATCH, MAX_IMAGE_SIDE, MAX_TOKENS = 256, 8192, 256, 8192, 65_536
ARCHITECTURE_RULES: Dict[str, Rule] = {
    "depth": integer(1, MAX_DEPTH), "embed_dim": integer(1, MAX_WIDTH), "num_heads": integer(1, MAX_WIDTH),
    "last_heads": integer(0, MAX_WIDTH, null=True), "patch_size": integer(1, MAX_PATCH),
    "in_chans": integer(1, 64), "mlp_ratio": number(gt=0, le=16), "qkv_bias": flag(),
    "layer_scale": number(null=True), "drop_path_rate": number(ge=0, lt=1), "norm_eps": number(gt=0, le=1),
    "pos_embed_type": text("learned", "sincos"), "class_token": flag(), "num_reg_tokens": integer(0, 64),
    "no_embed_class": flag(), "qk_norm": flag(), "mlp_layer": text(*MLP_LAYERS), "act_layer": text(*ACT_LAYERS),
    "scale_mlp_norm": flag(),
}
#: Seconds to wait for the weights server before calling ``timm:NAME`` unreachable.


def infer_architecture(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> Dict[str, Any]:
    """Derive ``VisionTransformer`` kwargs from weight shapes (release key names accepted).

    The block variants are read off key names and shapes: q/k norm (``attn.q_norm``), the MLP kind (``mlp.fc1_g``:
    ``swiglu``; an ``fc2`` half as wide as ``fc1``: ``swiglu_packed``, with SiLU, the activation of both), the
    MLP's ``norm``, layer scale. Head counts can only be read from the width of a q/k norm: without one, the
    standard count of that width is used (else 64 channels per head); override with ``num_heads`` /
    ``last_heads`` when that is wrong. Raises ``CheckpointError`` when the shapes do not describe a ViT."""
    sd, _ = normalize_keys(state_dict, source)

    def shape(key: str, ndim: int) -> Tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"{source}: no {key}, not a ViT backbone checkpoint")
        if sd[key].ndim != ndim:
            raise CheckpointError(f"{source}: {key} has shape {tuple(sd[key].shape)}, a ViT's has {ndim} "
                                  "dimensions; the file is damaged or not a ViT")
        return tuple(sd[key].shape)

    embed_dim, in_chans, patch, patch_w = shape("patch_embed.proj.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has a {patch}x{patch_w} kernel; "
                              "only square patches are supported")
    numbers = [int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m]
    depth = 1 + max(numbers, default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: no blocks.* weights, not a ViT backbone checkpoint")
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{source}: key names describe {depth} blocks (blocks.{depth - 1}.*), more than "
                              f"the {MAX_DEPTH} a ViT plausibly has; the file is damaged")
    mlp_layer, hidden = _mlp_of(sd, shape)
    heads = next((s["num_heads"] for s in VIT_SIZES.values() if s["embed_dim"] == embed_dim),
                 max(1, embed_dim // 64))
    if embed_dim % heads:
        heads = 1
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    last_heads = None
    if qk_norm:  # each head's channels are normalised: the norm's width is the head width
        heads = _heads_of_qk_norm(sd, 0, embed_dim, heads, source)
        last = _heads_of_qk_norm(sd, depth - 1, embed_dim, heads, source)
        last_heads = last if last != heads else None
    variants = dict(qk_norm=qk_norm, mlp_layer=mlp_layer, act_layer="gelu" if mlp_layer == "mlp" else "silu",
                    scale_mlp_norm="blocks.0.mlp.norm.weight" in sd)
    class_token = "cls_token" in sd
    num_reg = shape("reg_token", 3)[1] if "reg_token" in sd else 0
    prefix = int(class_token) + num_reg
    rows = _position_rows(sd, embed_dim, source) if "pos_embed" in sd else 196 + prefix
    no_embed_class = prefix > 0 and is_square_grid(rows)
    grid = rows - (0 if no_embed_class else prefix)
    if not is_square_grid(grid):
        raise CheckpointError(f"{source}: pos_embed has {rows} rows, not a square grid of patches plus {prefix} "
                              "prefix token(s); the file is damaged or not a ViT")
    return dict(img_size=math.isqrt(grid) * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
                depth=depth, num_heads=heads, **({"last_heads": last_heads} if last_heads else {}),
                mlp_ratio=mlp_ratio_of(hidden, embed_dim), qkv_bias="blocks.0.attn.qkv.bias" in sd,
                layer_scale=1e-5 if "blocks.0.ls1.gamma" in sd else None,
                class_token=class_token, num_reg_tokens=num_reg, no_embed_class=no_embed_class,
                **{key: value for key, value in variants.items() if value != VARIANT_DEFAULTS[key]})


def _mlp_of(sd: Mapping[str, Tensor], shape: Callable[[str, int], Tuple[int, ...]]) -> Tuple[str, int]:
    """``(mlp_layer, hidden width)`` of block 0's MLP (the width timm's ``hidden_features`` counts)."""
    if "blocks.0.mlp.fc1_g.weight" in sd:
        return "swiglu", shape("blocks.0.mlp.fc1_g.weight", 2)[0]
    hidden = shape("blocks.0.mlp.fc1.weight", 2)[0]
    output = sd.get("blocks.0.mlp.fc2.weight")
    packed = output is not None and output.ndim == 2 and 2 * output.shape[1] == hidden
    return ("swiglu_packed" if packed else "mlp"), hidden


def _heads_of_qk_norm(sd: Mapping[str, Tensor], block: int, embed_dim: int, default: int, source: str) -> int:
    """The head count of ``block``: the width over the head width its q norm has (``default`` without one)."""
    norm = sd.get(f"blocks.{block}.attn.q_norm.weight")
    if norm is None:
        return default
    if norm.ndim != 1 or not 0 < norm.shape[0] <= embed_dim or embed_dim % norm.shape[0]:
        raise CheckpointError(f"{source}: blocks.{block}.attn.q_norm.weight has shape {tuple(norm.shape)}, not a "
                              f"head width that divides the width {embed_dim}; the file is damaged or not a ViT")
    return embed_dim // norm.shape[0]


def _position_rows(sd: Mapping[str, Tensor], embed_dim: int, source: str) -> int:
    table = sd["pos_embed"]
    if table.ndim not in (2, 3) or table.shape[-1] != embed_dim or table.numel() == 0:
        raise CheckpointError(f"{source}: pos_embed of shape {tuple(table.shape)} does not fit width {embed_dim}")
    return table.numel() // embed_dim


def check_architecture(config: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointError`` naming ``source`` unless ``config`` (``VisionTransformer`` kwargs) describes a
    plausible ViT: known settings of the right types, depth, width, patch and image size within the
    ``MAX_*`` bounds, head counts that divide the width, at most ``MAX_TOKENS`` patches."""
    defaults = {name: p.default for name, p in inspect.signature(VisionTransformer).parameters.items()}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise CheckpointError(f"{source}: unknown architecture setting(s) {', '.join(map(str, unknown))}")
    full = {**defaults, **config}
    for key, rule in ARCHITECTURE_RULES.items():
        if not rule.accepts(full[key]):
            raise CheckpointError(f"{source}: describes an implausible ViT: {key} must be {rule.describe()}, "
                                  f"got {full[key]!r}")
    width, patch = full["embed_dim"], full["patch_size"]
    for key in ("num_heads", "last_heads"):
        if full[key] and width % full[key]:
            raise CheckpointError(f"{source}: {key}={full[key]} does not divide the width {width}")
    size = full["img_size"]
    sides = [size] * 2 if isinstance(size, int) and not isinstance(size, bool) else size
    side_rule = integer(patch, MAX_IMAGE_SIDE)
    if not isinstance(sides, (list, tuple)) or len(sides) != 2 or not all(side_rule.accepts(v) for v in sides):
        raise CheckpointError(f"{source}: img_size must be a size (or height, width) from the patch {patch} to "
                              f"{MAX_IMAGE_SIDE} px, got {size!r}")
    tokens = (sides[0] // patch) * (sides[1] // patch)
    if tokens > MAX_TOKENS:
        raise CheckpointError(f"{source}: {sides[0]}x{sides[1]} px with patch {patch} gives {tokens:,} tokens, "
                              f"more than {MAX_TOKENS:,}")
    hidden = int(width * full["mlp_ratio"])
    if hidden < 1:
        raise CheckpointError(f"{source}: mlp_ratio {full['mlp_ratio']} leaves no MLP channel at width {width}")
    if full["mlp_layer"] == "swiglu_packed" and hidden % 2:
        raise CheckpointError(f"{source}: mlp_ratio {full['mlp_ratio']} gives an odd fc1 width {hidden} at width "
                              f"{width}; a packed gated MLP (swiglu_packed) stacks gate and value, an even width")


def expected_shapes(config: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """The shape of every weight of ``VisionTransformer(**config)``, computed without building it (timm's
    key names). ``config`` must have passed ``check_architecture``."""
    defaults = {name: p.default for name, p in inspect.signature(VisionTransformer).parameters.items()}
    c = {**defaults, **config}
    width, depth, patch = c["embed_dim"], c["depth"], c["patch_size"]
    height, wide = (c["img_size"], c["img_size"]) if isinstance(c["img_size"], int) else c["img_size"]
    prefix = int(c["class_token"]) + c["num_reg_tokens"]
    rows = (height // patch) * (wide // patch) + (0 if c["no_embed_class"] else prefix)
    shapes: Dict[str, Tuple[int, ...]] = {"patch_embed.proj.weight": (width, c["in_chans"], patch, patch),
                                          "patch_embed.proj.bias": (width,), "pos_embed": (1, rows, width)}
    if c["class_token"]:
        shapes["cls_token"] = (1, 1, width)
    if c["num_reg_tokens"]:
        shapes["reg_token"] = (1, c["num_reg_tokens"], width)
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.proj.weight": (width, width), "attn.proj.bias": (width,), "norm2.weight": (width,),
             "norm2.bias": (width,), **_mlp_shapes(c, width)}
    if c["qkv_bias"]:
        block["attn.qkv.bias"] = (3 * width,)
    if c["layer_scale"]:
        block.update({"ls1.gamma": (width,), "ls2.gamma": (width,)})
    heads = [c["num_heads"]] * (depth - 1) + [c["last_heads"] or c["num_heads"]]
    for index in range(depth):
        shapes.update({f"blocks.{index}.{key}": shape for key, shape in block.items()})
        if c["qk_norm"]:
            head_width = (width // heads[index],)
            shapes.update({f"blocks.{index}.attn.{norm}.{p}": head_width
                           for norm in ("q_norm", "k_norm") for p in ("weight", "bias")})
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    return shapes


def _mlp_shapes(c: Mapping[str, Any], width: int) -> Dict[str, Tuple[int, ...]]:
    """The shapes of a block's MLP weights (``mlp.*``, timm's names for each ``mlp_layer``)."""
    hidden = int(width * c["mlp_ratio"])
    inputs = ["fc1_g", "fc1_x"] if c["mlp_layer"] == "swiglu" else ["fc1"]
    inner = hidden // 2 if c["mlp_layer"] == "swiglu_packed" else hidden  # what fc2 reads
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name in inputs:
        shapes.update({f"mlp.{name}.weight": (hidden, width), f"mlp.{name}.bias": (hidden,)})
    if c["scale_mlp_norm"]:
        shapes.update({"mlp.norm.weight": (inner,), "mlp.norm.bias": (inner,)})
    shapes.update({"mlp.fc2.weight": (width, inner), "mlp.fc2.bias": (width,)})
    return shapes


def _misfit(source: str, what: str, missing: List[str], mismatched: List[str],
            unexpected: Sequence[str] = ()) -> str:
    return (f"{source}: does not fit {what}: {_differences(missing, mismatched, unexpected)}. The file is incomplete "
            "or holds another architecture")


def check_fits(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], source: str,
               allow_partial: bool = False) -> Optional[str]:
    """Check, before allocating, that the weights in ``state_dict`` (normalised keys) are the weights of
    ``VisionTransformer(**config)`` (the position table aside, which is resampled to the grid), and that the
    file holds no weight the model lacks (``state_dict`` comes from ``normalize_keys``, which sets aside the keys
    that may be ignored): any other weight would change the computation, so it is never dropped.

    Raises ``CheckpointError`` naming ``source`` when the file holds less than half of the model's weights (then
    the architecture it describes is not the one its tensors hold: said first, whatever ``allow_partial``), and
    when a weight is missing, mis-shaped or has no place in the model (unless ``allow_partial``). Returns what a
    strict check refuses (with ``allow_partial``), ``None`` when every weight fits."""
    shapes = expected_shapes(config)
    unexpected = [key for key in state_dict if key not in shapes]
    shapes.pop("pos_embed")
    missing = [key for key in shapes if key not in state_dict]
    mismatched = [f"{key} {tuple(state_dict[key].shape)} vs {shape}" for key, shape in shapes.items()
                  if key in state_dict and tuple(state_dict[key].shape) != shape]
    expected = sum(math.prod(shape) for shape in shapes.values())
    found = sum(math.prod(shape) for key, shape in shapes.items()
                if key in state_dict and tuple(state_dict[key].shape) == shape)
    if 2 * found < expected:
        raise CheckpointError(f"{source}: describes a ViT of {expected:,} weights (width {config.get('embed_dim')}, "
                              f"depth {config.get('depth')}) but holds only {found:,} of them "
                              f"({_differences(missing, mismatched, unexpected)}); its metadata or key names do not "
                              "match its tensors")
    problem = _misfit(source, "the architecture it describes", missing, mismatched, unexpected) \
        if missing or mismatched or unexpected else None
    if problem and not allow_partial:
        raise CheckpointError(problem)
    return problem


def _differences(missing: List[str], mismatched: List[str], unexpected: Sequence[str] = ()) -> str:
    return "; ".join(([f"missing {_preview(missing)}"] if missing else []) +
                     ([f"shape mismatch {_preview(mismatched)}"] if mismatched else []) +
                     ([f"no place for {_preview(list(unexpected))} (weights that change the computation)"]
                      if unexpected else []))

