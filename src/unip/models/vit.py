"""Vision Transformer backbone with attention taps.

Parameter names are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.ls1.gamma``, ``blocks.{i}.norm2``,
``blocks.{i}.mlp.fc1/fc2``, ``norm``), so timm, MAE, DINO, iBOT, DeiT and UNIP weights load by name.

The block covers the ViT variants timm ships as strong teachers, under timm's names too: q/k norm
(``attn.q_norm``/``attn.k_norm``, a LayerNorm over each head's channels before the scaled q·kᵀ), gated MLPs
(``SwiGLUPacked``: ``mlp.fc1`` holding gate and value; ``SwiGLU``: ``mlp.fc1_g``/``mlp.fc1_x``), a norm inside the
MLP (``mlp.norm``), the MLP's activation (GELU, its tanh approximation, SiLU), register tokens and layer scale
(``ls1/ls2.gamma``). A plain ViT runs exactly the operations it ran before these variants existed.

Beyond timm's model it can

* give each block its own head count (``last_heads``: UNIP students' last block has as many heads as the
  teacher block they were distilled from),
* return the pre-softmax attention logits of one block and stop there (``attention_logits``),
* return token maps of chosen blocks (``forward_intermediates``, timm's API: 0-based indices) and
  post-softmax maps (``attention_maps``).

Every block whose attention matrix is not asked for runs ``scaled_dot_product_attention``.
The attention taps number layers from 1 (block ``i`` of ``blocks`` is layer ``i + 1``); the timm feature API
(``forward_intermediates``, ``forward_features``) keeps timm's 0-based block indices.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.models.pos_embed import resample_pos_embed, sincos_pos_embed_2d


#: The MLP activations (timm's ``act_layer`` names).
ACT_LAYERS: Dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "silu": nn.SiLU}
#: The block variants and their defaults (a plain ViT). ``VisionTransformer.config`` holds a variant setting only
#: where it differs from its default, so a plain ViT's config, and the header of its file, is what it was before
#: the variants existed.
VARIANT_DEFAULTS: Dict[str, Any] = {"qk_norm": False, "mlp_layer": "mlp", "act_layer": "gelu",
                                    "scale_mlp_norm": False}


def mlp_ratio_of(hidden: int, width: int) -> float:
    """The ``mlp_ratio`` whose ``int(width * mlp_ratio)`` (what the block, like timm's, computes) is ``hidden``:
    ``hidden / width``, nudged up by an ulp where floating point would round it below (e.g. 15 / 11 * 11 < 15)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: ``[B, C, H, W]`` → ``[B, h*w, D]`` and the grid ``(h, w)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize or pad the image first")
        # The stride-patch convolution computed as what it is, one matrix product over the flattened patches
        # (the weights stay timm's Conv2d). cuDNN runs it as a generic convolution: 1.7-2.6 ms per forward on
        # an H100 (bf16, batch 256, 224 px; profiled) against about 0.1 ms for the product.
        batch, channels = x.shape[:2]
        patch = self.patch_size
        grid = (height // patch, width // patch)
        patches = (x.reshape(batch, channels, grid[0], patch, grid[1], patch).permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch, grid[0] * grid[1], channels * patch * patch))
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias), grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout). With ``qk_norm`` (timm's) queries
    and keys pass a LayerNorm over each head's channels (``q_norm``, ``k_norm``) before the scaled q·kᵀ."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # None, not nn.Identity, without q/k norm: a plain block runs no extra module
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` → ``[B, heads, N, head_dim]``."""
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def _norm_qk(self, query: Tensor, key: Tensor) -> Tuple[Tensor, Tensor]:
        if self.q_norm is None:
            return query, key
        return self.q_norm(query), self.k_norm(key)

    def attention_logits(self, x: Tensor) -> Tensor:
        """Pre-softmax scaled q·kᵀ, ``[B, heads, N, N]``; only q and k are projected.

        ``qkv`` may hold only the q and k rows (``drop_value_rows``): then it is called as it is, which
        lets a quantised or compiled ``qkv`` module run its own kernel."""
        dim = self.num_heads * self.head_dim
        if self.qkv.out_features == 2 * dim:
            query, key = self.qkv(x).chunk(2, dim=-1)
        else:
            bias = self.qkv.bias[: 2 * dim] if self.qkv.bias is not None else None
            query, key = F.linear(x, self.qkv.weight[: 2 * dim], bias).chunk(2, dim=-1)
        query, key = self._norm_qk(self._split_heads(query), self._split_heads(key))
        return (query * self.scale) @ key.transpose(-2, -1)

    def drop_value_rows(self) -> None:
        """Keep only the q and k rows of ``qkv`` (a block that will only ever give ``attention_logits``)."""
        dim = self.num_heads * self.head_dim
        old = self.qkv
        self.qkv = nn.Linear(old.in_features, 2 * dim, bias=old.bias is not None,
                             device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(old.weight[: 2 * dim])
            if old.bias is not None:
                self.qkv.bias.copy_(old.bias[: 2 * dim])
        self.qkv.requires_grad_(old.weight.requires_grad)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns the block's attention output ``[B, N, D]`` and, if asked, the softmax map
        ``[B, heads, N, N]`` (otherwise ``None``, computed by fused SDPA)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        query, key = self._norm_qk(query, key)
        attention = None
        if return_attention:
            attention = ((query * self.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
            out = attention @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), attention


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT / DeiT III / DINOv2); parameter ``gamma`` as in timm."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class MlpOutput(nn.Module):
    """What every MLP ends with: the activation, timm's optional ``norm`` of the hidden channels
    (``scale_mlp_norm``) and ``fc2``. Subclasses make ``fc1`` (or its parts) first, so parameters keep timm's order."""

    def _add_output(self, dim: int, hidden_dim: int, act_layer: str, norm_eps: Optional[float]) -> None:
        self.act_layer = act_layer
        self.act = ACT_LAYERS[act_layer]()
        self.norm = nn.LayerNorm(hidden_dim, eps=norm_eps) if norm_eps else None
        self.fc2 = nn.Linear(hidden_dim, dim)

    def _project(self, hidden: Tensor) -> Tensor:
        return self.fc2(hidden if self.norm is None else self.norm(hidden))


class Mlp(MlpOutput):
    """``fc2(act(fc1(x)))`` (timm's ``Mlp``; GELU by default). With ``gelu_epilogue`` (a frozen teacher's
    tanh-approximated GELU, set by ``Teacher.set_gelu``) CUDA computes ``fc1`` and the GELU as one cuBLASLt product:
    its GELU epilogue (the tanh approximation, on the fp32 accumulator) saves a pass over the widest activation.
    Without gradients only (the epilogue keeps no input for a backward pass); elsewhere ``act`` computes the same
    function. ``norm_eps`` adds timm's ``norm`` of the hidden channels."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: str = "gelu", norm_eps: Optional[float] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self._add_output(dim, hidden_dim, act_layer, norm_eps)
        self.gelu_epilogue = False

    def forward(self, x: Tensor) -> Tensor:
        if self.gelu_epilogue and x.is_cuda and not torch.is_grad_enabled():
            weight = self.fc1.weight
            hidden = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]).to(weight.dtype), weight.t(),
                                             use_gelu=True)
            return self._project(hidden.view(*x.shape[:-1], -1))
        return self._project(self.act(self.fc1(x)))


class GluMlp(MlpOutput):
    """timm's ``SwiGLUPacked`` (its ``GluMlp`` with the gate first): ``fc1`` gives gate and value stacked,
    ``fc2(act(gate) * value)``; ``hidden_dim`` counts both, as timm's does."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: str = "silu", norm_eps: Optional[float] = None) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"a packed gated MLP needs an even fc1 width (gate and value), not {hidden_dim}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self._add_output(dim, hidden_dim // 2, act_layer, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self._project(self.act(gate) * value)


class SwiGLU(MlpOutput):
    """timm's ``SwiGLU``: gate and value from separate projections, ``fc2(act(fc1_g(x)) * fc1_x(x))``."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: str = "silu", norm_eps: Optional[float] = None) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim)
        self.fc1_x = nn.Linear(dim, hidden_dim)
        self._add_output(dim, hidden_dim, act_layer, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._project(self.act(self.fc1_g(x)) * self.fc1_x(x))


#: The MLP kinds (``mlp_layer``), named after timm's classes.
MLP_LAYERS: Dict[str, Callable[..., MlpOutput]] = {"mlp": Mlp, "swiglu_packed": GluMlp, "swiglu": SwiGLU}


#: How a drop-path rate spreads over the blocks: ``linear`` rises from 0 in the first block to the rate in the last
#: (timm's rule, and the release's fine-tuning backbone's); ``uniform`` is the rate in every block (the release's
#: pre-training students, docs/recipe.md#pre-training).
DROP_PATH_SCHEDULES = ("linear", "uniform")


def drop_path_rates(rate: float, depth: int, schedule: str = "linear") -> List[float]:
    """The drop-path probability of each of ``depth`` blocks for ``rate`` spread by ``schedule``."""
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"drop-path schedule must be one of {', '.join(DROP_PATH_SCHEDULES)}, not {schedule!r}")
    if schedule == "uniform":
        return [float(rate)] * depth
    return torch.linspace(0, rate, depth, device="cpu").tolist()  # also under a meta device


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        # the rate as a tensor too: blocks with different rates then share one compiled graph
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)
        self.set_rate(drop_prob)

    def set_rate(self, drop_prob: float) -> None:
        """Drop the branch with probability ``drop_prob`` from now on."""
        self.drop_prob = float(drop_prob)
        self.keep_prob.fill_(1.0 - self.drop_prob)
        self.active = self.drop_prob > 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not self.active or not self.training:
            return x
        keep = self.keep_prob.float()  # fp32 even under autocast: a bf16 0.9 is 0.8984 (drop rate +1.6 %)
        mask = torch.bernoulli(keep.expand((x.shape[0],) + (1,) * (x.ndim - 1)))
        return x * (mask / keep).to(x.dtype)  # scale the per-sample mask, not the activations: one pass over x


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 layer_scale: Optional[float], drop_path: float, norm_eps: float, qk_norm: bool = False,
                 mlp_layer: str = "mlp", act_layer: str = "gelu", scale_mlp_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, norm_eps)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP_LAYERS[mlp_layer](dim, int(dim * mlp_ratio), act_layer, norm_eps if scale_mlp_norm else None)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        # what ``attention_logits`` runs: a plain function of the block, so that ``compile_blocks`` can compile
        # it and a deep copy of the block still computes with the copy's weights
        self.logits_fn: Callable[["Block", Tensor], Tensor] = block_attention_logits

    def attention_logits(self, x: Tensor) -> Tensor:
        return self.logits_fn(self, x)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        attended, attention = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path1(self.ls1(attended))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attention


def block_attention_logits(block: Block, x: Tensor) -> Tensor:
    """Pre-softmax scaled q·kᵀ of ``block`` for its input tokens ``x`` (what a distilled block runs)."""
    return block.attn.attention_logits(block.norm1(x))


class VisionTransformer(nn.Module):
    """ViT backbone (no classifier head).

    Args mirror timm's ``VisionTransformer`` where they overlap. Additions: ``last_heads`` (head count of
    the last block), ``pos_embed_type`` (``"learned"`` or ``"sincos"``: fixed 2-D sin-cos table with a
    zero CLS row, stored as a frozen parameter like MAE), ``num_reg_tokens`` and ``no_embed_class``
    (timm's register-token / DINOv2 layout), and the block variants of timm's ViT, with timm's argument names:
    ``qk_norm``, ``mlp_layer`` (``"mlp"``, ``"swiglu_packed"`` or ``"swiglu"``: timm's ``Mlp``, ``SwiGLUPacked``,
    ``SwiGLU``; the MLP's width is ``int(embed_dim * mlp_ratio)`` as in timm, gate and value together for
    ``swiglu_packed``), ``act_layer`` (``"gelu"``, ``"gelu_tanh"``, ``"silu"``: the MLP's activation, the gate's in
    a gated MLP) and ``scale_mlp_norm``. ``self.config`` holds the arguments (a variant setting only where it
    differs from ``VARIANT_DEFAULTS``), so ``VisionTransformer(**model.config)`` rebuilds the architecture.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, last_heads: Optional[int] = None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, layer_scale: Optional[float] = None,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, pos_embed_type: str = "learned",
                 class_token: bool = True, num_reg_tokens: int = 0, no_embed_class: bool = False,
                 qk_norm: bool = False, mlp_layer: str = "mlp", act_layer: str = "gelu",
                 scale_mlp_norm: bool = False) -> None:
        super().__init__()
        img_size = _pair(img_size)
        if pos_embed_type not in ("learned", "sincos"):
            raise ValueError(f"pos_embed_type must be 'learned' or 'sincos', not {pos_embed_type!r}")
        for name, value, table in (("mlp_layer", mlp_layer, MLP_LAYERS), ("act_layer", act_layer, ACT_LAYERS)):
            if value not in table:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, table))}, not {value!r}")
        variants = dict(qk_norm=qk_norm, mlp_layer=mlp_layer, act_layer=act_layer, scale_mlp_norm=scale_mlp_norm)
        self.config = dict(img_size=list(img_size), patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, last_heads=last_heads,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, layer_scale=layer_scale,
                           drop_path_rate=drop_path_rate, norm_eps=norm_eps, pos_embed_type=pos_embed_type,
                           class_token=class_token, num_reg_tokens=num_reg_tokens,
                           no_embed_class=no_embed_class,
                           **{k: v for k, v in variants.items() if v != VARIANT_DEFAULTS[k]})
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_prefix_tokens = int(class_token) + num_reg_tokens
        self.no_embed_class = no_embed_class

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, embed_dim)) if num_reg_tokens else None
        pos_rows = self.grid_size[0] * self.grid_size[1] + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_rows, embed_dim),
                                      requires_grad=pos_embed_type == "learned")

        heads = [num_heads] * depth
        if last_heads:
            heads[-1] = last_heads
        drop_rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, heads[i], mlp_ratio, qkv_bias, layer_scale, drop_rates[i], norm_eps, **variants)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights(pos_embed_type)

    # ------------------------------------------------------------------------------ construction
    def _init_weights(self, pos_embed_type: str) -> None:
        if pos_embed_type == "sincos":
            table = sincos_pos_embed_2d(self.embed_dim, self.grid_size)
            if not self.no_embed_class:
                table = torch.cat([table.new_zeros(self.num_prefix_tokens, self.embed_dim), table])
            self.pos_embed.data.copy_(table.unsqueeze(0))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def heads_per_block(self) -> List[int]:
        return [block.attn.num_heads for block in self.blocks]

    def set_drop_path(self, rate: float, schedule: str = "linear") -> None:
        """Set the blocks' drop-path probabilities: ``rate`` spread over them by ``schedule`` (``drop_path_rates``);
        the config keeps ``drop_path_rate`` (drop path changes training, not the architecture)."""
        for block, block_rate in zip(self.blocks, drop_path_rates(rate, self.depth, schedule)):
            block.drop_path1.set_rate(block_rate)
            block.drop_path2.set_rate(block_rate)
        self.config["drop_path_rate"] = float(rate)

    def no_weight_decay(self) -> set:
        """Names of parameters that take no weight decay besides biases and norms (timm convention)."""
        return {"pos_embed", "cls_token", "reg_token"}

    # ------------------------------------------------------------------------------ embedding
    #: ``True`` resamples the position table for every input, even at the training grid (where bicubic
    #: resampling is the identity), so that a graph traced with a dynamic input size (ONNX export) holds the
    #: resampling instead of the table of the traced size. ``unip.deploy.onnx_export`` sets it while tracing.
    always_resample_pos_embed: bool = False

    def _pos_embed_for(self, grid: Tuple[int, int]) -> Tensor:
        """The position table for a token grid, interpolated bicubically when it differs from training."""
        always = self.always_resample_pos_embed
        if not always and grid == self.grid_size:
            return self.pos_embed
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_pos_embed(self.pos_embed, grid, num_prefix_tokens=prefix, old_grid=self.grid_size,
                                  always=always)

    def embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Image ``[B, C, H, W]`` → tokens ``[B, prefix + h*w, D]`` (CLS first, then registers) and grid."""
        tokens, grid = self.patch_embed(x)
        pos_embed = self._pos_embed_for(grid)
        prefix = [t.expand(tokens.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            return torch.cat(prefix + [tokens + pos_embed], dim=1), grid
        return torch.cat(prefix + [tokens], dim=1) + pos_embed, grid

    def _check_layer(self, layer: int) -> int:
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer {layer} is out of range: this model has layers 1..{self.depth}")
        return layer

    # ------------------------------------------------------------------------------ taps
    def attention_logits(self, x: Tensor, layer: int) -> Tensor:
        """Pre-softmax scaled q·kᵀ of block ``layer`` (1-based): ``[B, heads, N, N]``, N = prefix + h*w.

        Runs blocks ``1..layer-1`` and only the q/k projection of block ``layer``; nothing after it."""
        self._check_layer(layer)
        tokens, _ = self.embed(x)
        for block in self.blocks[: layer - 1]:
            tokens, _ = block(tokens)
        return self.blocks[layer - 1].attention_logits(tokens)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = True, output_dict: bool = False,
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]], Dict[str, object]]:
        """timm's ``forward_intermediates`` (same arguments, same meaning; only ``intermediates_only``
        defaults to ``True`` here).

        ``indices``: 0-based block indices (negative ones count from the end), an int ``n`` for the last
        ``n`` blocks, or ``None`` for all. Intermediates come in block order, one per distinct block, as the
        block's raw output (``norm=True`` applies the final norm), prefix tokens (CLS, registers) dropped:
        ``[B, D, h, w]`` for ``output_fmt="NCHW"``, ``[B, h*w, D]`` for ``"NLC"``.

        Returns the list of intermediates when ``intermediates_only`` (blocks after the deepest requested
        one are not run), else ``(final normed tokens [B, N, D], intermediates)``; ``return_prefix_tokens``
        turns each intermediate into ``(map, prefix tokens [B, prefix, D])``; ``output_dict`` returns
        ``{"image_intermediates", "image_intermediates_prefix"?, "image_features"?}`` as timm does."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
        take = self.take_indices(indices)
        tokens, (height, width) = self.embed(x)
        last = max(take) + 1 if intermediates_only or stop_early else self.depth
        intermediates: List[Tensor] = []
        for index, block in enumerate(self.blocks[:last]):
            tokens, _ = block(tokens)
            if index in take:
                intermediates.append(self.norm(tokens) if norm else tokens)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        maps = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            maps = [y.transpose(1, 2).reshape(y.shape[0], -1, height, width) for y in maps]
        if output_dict:
            result: Dict[str, object] = {"image_intermediates": maps}
            if return_prefix_tokens and self.num_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = self.norm(tokens)
            return result
        if return_prefix_tokens and self.num_prefix_tokens:
            maps = list(zip(maps, prefix))
        return maps if intermediates_only else (self.norm(tokens), maps)

    def take_indices(self, indices: Optional[Union[int, Sequence[int]]] = None) -> List[int]:
        """Absolute 0-based block indices that ``indices`` selects (timm's ``feature_take_indices`` rule):
        ``None`` → all blocks, an int ``n`` → the last ``n``, a sequence → those (negative from the end)."""
        if indices is None:
            indices = self.depth
        if isinstance(indices, int):
            if not 0 < indices <= self.depth:
                raise ValueError(f"last-n ({indices}) is out of range: this model has {self.depth} blocks")
            return list(range(self.depth - indices, self.depth))
        take = [self.depth + int(i) if int(i) < 0 else int(i) for i in indices]
        bad = [i for i in take if not 0 <= i < self.depth]
        if bad or not take:
            raise ValueError(f"block indices {list(indices)} out of range: this model has blocks 0..{self.depth - 1}")
        return take

    def iter_attention_maps(self, x: Tensor, layers: Optional[Iterable[int]] = None
                            ) -> Iterator[Tuple[int, Tensor]]:
        """Yield ``(layer, attention [B, heads, N, N])`` post-softmax for the chosen blocks (all by
        default) as each block runs, so a caller can reduce a map and drop it before the next block.

        Blocks not asked for run fused SDPA; the loop stops after the deepest requested block."""
        wanted = {self._check_layer(layer) for layer in layers} if layers is not None \
            else set(range(1, self.depth + 1))
        tokens, _ = self.embed(x)
        for index, block in enumerate(self.blocks[: max(wanted)], start=1):
            tokens, attention = block(tokens, return_attention=index in wanted)
            if attention is not None:
                yield index, attention

    def attention_maps(self, x: Tensor, layers: Optional[Iterable[int]] = None) -> Dict[int, Tensor]:
        """Post-softmax attention ``{layer: [B, heads, N, N]}`` of the chosen blocks (all by default)."""
        return dict(self.iter_attention_maps(x, layers))

    def token_grid(self, x: Tensor) -> Tuple[int, int]:
        """The ``(h, w)`` token grid an input of ``x``'s size gives."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def forward_features(self, x: Tensor) -> Tensor:
        """All blocks and the final norm: tokens ``[B, N, D]`` (CLS first), as timm's ``forward_features``."""
        tokens, _ = self.embed(x)
        for block in self.blocks:
            tokens, _ = block(tokens)
        return self.norm(tokens)

    def forward(self, x: Tensor) -> Tensor:
        """Same as ``forward_features``: this backbone has no classifier."""
        return self.forward_features(x)

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (regional compilation): identical blocks share one compiled
        graph, so compiling a 24-block model costs about one block, not 24 unrolled ones. A block's
        ``attention_logits`` (what a distilled block runs instead of ``forward``: norm, q/k projection, scaled
        q·kᵀ) is compiled too, so its norm, casts and scaling fuse like the other blocks' do."""
        logits_fn = torch.compile(block_attention_logits, **options)
        for block in self.blocks:
            block.compile(**options)
            block.logits_fn = logits_fn


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

