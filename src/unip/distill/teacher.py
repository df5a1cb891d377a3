"""The frozen teacher of NMI-HAD: runs up to its distilled block and returns that block's attention logits
on the student's token grid.

* frozen and in eval mode; the blocks after the distilled one and the final norm are dropped, so they
  cost neither memory nor time;
* grid matching: when the teacher's patch differs from the student's (e.g. a patch-14 DINOv2 teacher and
  a patch-16 student) its input is resized bicubically to ``grid × teacher patch`` so both see the same
  ``h × w`` token grid;
* register tokens (DINOv2-reg, timm ``reg_token``) are dropped from both axes of the logits, so the
  result has ``1 + h*w`` tokens (CLS first) like the student's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.checkpoint import load_model
from unip.errors import ConfigError
from unip.fingerprint import weights_fingerprint
from unip.models.cpu_linear import use_onednn_linears
from unip.models.quantize import quantize_linear_fp8
from unip.models.vit import Mlp, VisionTransformer


#: How the frozen teacher's weights can be stored (``Teacher.set_precision``).
TEACHER_PRECISIONS = ("fp32", "bf16", "fp8")
#: Which GELU the teacher's MLPs compute (``Teacher.set_gelu``).
TEACHER_GELUS = ("exact", "tanh")


class Teacher(nn.Module):
    """Wraps a ``VisionTransformer``; ``forward(images)`` → logits ``[B, heads, 1 + h*w, 1 + h*w]``.

    ``images`` are the student's input ``[B, C, H, W]``; ``student_patch`` is the student's patch size."""

    def __init__(self, model: VisionTransformer, layer: int, student_patch: int = 16,
                 weights_digest: Optional[str] = None) -> None:
        super().__init__()
        if not 1 <= layer <= model.depth:
            raise ConfigError(f"teacher layer {layer} is out of range: the teacher has layers 1..{model.depth}")
        if model.cls_token is None:
            raise ConfigError("the teacher has no CLS token; NMI-HAD distils CLS + patch tokens")
        #: the weights as loaded (``weights_digest``: of the file before ``fit_to_grid``), before the cut and any
        #: precision change, so that it names the teacher whatever layer or input size a run chooses
        self.weights_fingerprint = weights_digest or weights_fingerprint(model.state_dict())
        model.blocks = model.blocks[:layer]  # later blocks never run
        model.norm = nn.Identity()
        model.blocks[layer - 1].attn.drop_value_rows()  # block ``layer`` only gives q·kᵀ
        model.requires_grad_(False)
        self.model = model.eval()
        self.layer = layer
        self.student_patch = student_patch
        self.num_heads = model.heads_per_block[layer - 1]
        self.precision = "fp32"
        self.gelu = "exact"

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always eval: no drop path, whatever the caller sets

    def set_precision(self, precision: str, cpu_linear: Optional[str] = None) -> "Teacher":
        """Store the frozen weights as ``fp32`` (on a CPU, through oneDNN where that is faster, or as
        ``cpu_linear`` says: see ``unip.models.cpu_linear``), ``bf16`` (no per-step casts under bf16
        autocast, half the memory) or ``fp8`` (torchao dynamic FP8 linears on Ada/Hopper GPUs; ``ConfigError``
        elsewhere). Returns ``self``."""
        if precision not in TEACHER_PRECISIONS:
            raise ConfigError(f"teacher precision {precision!r}: choose one of {', '.join(TEACHER_PRECISIONS)}")
        if precision == "fp8":
            quantize_linear_fp8(self.model)
        else:
            self.model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
            if precision == "fp32":
                use_onednn_linears(self.model, cpu_linear)  # on CPUs where oneDNN's fp32 kernel is the faster one
        self.precision = precision
        return self.set_gelu(self.gelu)  # the GELU epilogue depends on the precision

    def set_gelu(self, gelu: str) -> "Teacher":
        """``exact`` (the model's own GELU) or ``tanh``: the tanh approximation, which a bf16 teacher on CUDA
        computes in the ``fc1`` product's epilogue (``Mlp.gelu_epilogue``). It moves a ViT-L's layer-18 logits
        by 4e-4 (relative, fp32), 40x less than storing the weights in bf16 does (docs/pretrain.md). Only plain
        GELU MLPs change: gated (SwiGLU) and SiLU MLPs keep their function, and a model whose GELU is the tanh
        approximation already keeps it. Returns ``self``."""
        if gelu not in TEACHER_GELUS:
            raise ConfigError(f"teacher GELU {gelu!r}: choose one of {', '.join(TEACHER_GELUS)}")
        for module in self.model.modules():
            if isinstance(module, Mlp) and module.act_layer in ("gelu", "gelu_tanh"):
                tanh = gelu == "tanh" or module.act_layer == "gelu_tanh"
                module.act = nn.GELU(approximate="tanh" if tanh else "none")
                module.gelu_epilogue = tanh and self.precision == "bf16"
        self.gelu = gelu
        return self

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """The teacher's input size for a student input of ``height × width`` (same token grid)."""
        patch = self.model.patch_size
        return height // self.student_patch * patch, width // self.student_patch * patch

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        size = self.input_size(*images.shape[-2:])
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        logits = self.model.attention_logits(images, self.layer)
        return drop_register_tokens(logits, self.model.num_prefix_tokens)


def drop_register_tokens(logits: Tensor, num_prefix_tokens: int) -> Tensor:
    """Keep CLS (token 0) and the patch tokens on both token axes of ``[B, H, N, N]`` logits."""
    if num_prefix_tokens <= 1:
        return logits
    # made on the device: a copy from the host would wait for the queued work (a sync every step)
    keep = torch.cat([torch.zeros(1, dtype=torch.long, device=logits.device),
                      torch.arange(num_prefix_tokens, logits.shape[-1], device=logits.device)])
    return logits.index_select(-2, keep).index_select(-1, keep)


def load_teacher(source: str, layer: int, student_patch: int = 16, img_size: Optional[int] = None) -> Teacher:
    """Load a teacher from any checkpoint format or ``timm:<name>[@file]`` and cut it at ``layer``.

    ``img_size`` (the student's input size) lets the teacher build its position table for that grid once
    instead of resampling it on every batch."""
    model, digest = load_teacher_model(source, img_size, student_patch)
    return Teacher(model, layer, student_patch, digest)


def load_teacher_model(source: str, img_size: Optional[int] = None,
                       student_patch: int = 16) -> Tuple[VisionTransformer, str]:
    """The teacher backbone of ``source`` (fitted to the grid of ``img_size`` px student inputs when given) and the
    digest of its weights as read (``unip.fingerprint``: independent of input size and the layer it is cut at)."""
    model = load_model(source)
    digest = weights_fingerprint(model.state_dict())
    return (fit_to_grid(model, img_size, student_patch) if img_size else model), digest


def fit_to_grid(model: VisionTransformer, student_size: int, student_patch: int = 16) -> VisionTransformer:
    """``model`` rebuilt for the token grid of ``student_size`` px student inputs (its input size is then
    ``grid × its patch``), the position table resampled once; ``model`` itself when it already fits."""
    size = student_size // student_patch * model.patch_size
    if tuple(model.config["img_size"]) == (size, size):
        return model
    config = dict(model.config, img_size=size)
    resized = VisionTransformer(**config)
    state = model.state_dict()
    state["pos_embed"] = model._pos_embed_for(resized.grid_size).detach()
    resized.load_state_dict(state)
    return resized.eval()
