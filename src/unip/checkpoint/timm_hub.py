"""``timm:NAME`` and ``timm:NAME@FILE`` sources: a timm model's architecture in our terms, its weights from
timm's hub (failing fast without a network) or from a local file read by our safe reader."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from unip.checkpoint.architecture import check_architecture
from unip.checkpoint.backbone import LoadedModel, build_backbone, load_weights
from unip.checkpoint.reading import _brief, extract_state_dict, read_checkpoint
from unip.errors import CheckpointError, ConfigError
from unip.models.vit import VARIANT_DEFAULTS, mlp_ratio_of

NETWORK_TIMEOUT_S = 3.0


def _open_timm(spec: str, allow_partial: bool, overrides: Dict[str, Any]) -> LoadedModel:
    """``NAME`` (timm downloads the weights) or ``NAME@FILE`` (a local weights file, read by our safe
    reader and passed through the model family's timm ``checkpoint_filter_fn`` for release layouts)."""
    name, at, weights_file = spec.partition("@")
    if not name or (at and not weights_file):
        raise CheckpointError(f"timm:{spec}: expected timm:NAME or timm:NAME@FILE, e.g. "
                              "timm:vit_base_patch16_224.mae@/path/to/weights.pth")
    if weights_file:  # read first: a missing or unsafe file fails before timm builds anything
        state_dict = extract_state_dict(read_checkpoint(weights_file)[0], weights_file)
    reference = _create_timm(name, pretrained=not weights_file)
    config = config_from_timm(reference, f"timm:{name}")
    config.update(overrides)
    check_architecture(config, f"timm:{spec}")
    model = build_backbone(config, f"timm:{name}")
    if weights_file:
        filter_fn = getattr(sys.modules[type(reference).__module__], "checkpoint_filter_fn", None)
        table = state_dict.get("pos_embed")
        try:
            state_dict = filter_fn(state_dict, reference) if filter_fn else state_dict
        except Exception as err:  # timm's filters index keys and reshape without checking
            raise CheckpointError(f"{weights_file}: does not fit timm:{name} ({_brief(err)})") from err
        if table is not None and table.shape[-1] != model.embed_dim and "pos_embed" in state_dict:
            state_dict = {**state_dict, "pos_embed": table}  # a misfit is reported with the file's own shape
    else:
        state_dict = reference.state_dict()
    report = load_weights(model, state_dict, allow_partial=allow_partial, name=weights_file or f"timm:{name}")
    report.source = f"timm:{spec}"
    return LoadedModel(model, report, f"timm model {name}", {"timm_model": name, **_normalization_of(reference)},
                       report.problem)


def _normalization_of(reference: nn.Module) -> Dict[str, Any]:
    """``{"normalization": {"mean", "std"}}`` that timm's ``pretrained_cfg`` gives for the model's weights (0–1
    scale; e.g. 0.5 for augreg tags, ImageNet's for MAE), or ``{}`` when it gives none."""
    cfg = getattr(reference, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return {}
    return {"normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}}


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    """``timm.create_model(name)`` without a classifier; errors become ``CheckpointError``. Without a
    network, pretrained weights come from timm's cache or fail at once (no minute of download retries)."""
    import timm

    if not timm.is_model(name):
        raise CheckpointError(f"timm:{name}: unknown timm model; see timm.list_models()")
    offline = _offline_for_download(name) if pretrained else False
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"timm:{name}: unknown timm model; see timm.list_models()") from err
        raise CheckpointError(f"timm:{name}: timm could not load the weights ({_brief(err)})") from err
    except Exception as err:  # network and hub errors come in many types
        raise CheckpointError(
            f"timm:{name}: could not get pretrained weights ({_brief(err, 160)}). "
            f"Offline, download the file elsewhere and pass timm:{name}@/path/to/weights") from err


def _offline_for_download(name: str) -> bool:
    """True when the weights of ``name`` are in the local cache but their server cannot be reached (timm
    must then read the cache without asking the server). Raises ``CheckpointError`` at once when they are
    neither cached nor reachable."""
    from huggingface_hub import constants as hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or hub.HF_HUB_OFFLINE:
        return False  # timm and the hub then answer quickly by themselves
    if cfg.hf_hub_id:
        url, cached = hub.ENDPOINT, _hub_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
    elif cfg.url:
        url, cached = cfg.url, os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints",
                                                           os.path.basename(urlparse(cfg.url).path)))
    else:
        return False
    host = _network_target(url)
    if _reachable(*host):
        return False
    if cached:
        return True
    raise CheckpointError(f"timm:{name}: cannot download the pretrained weights ({host[0]} does not answer: "
                          f"offline?); download them elsewhere and pass timm:{name}@/path/to/weights")


def _hub_cached(repo_id: str, filename: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)


def _network_target(url: str) -> Tuple[str, int]:
    """``(host, port)`` a download of ``url`` connects to first: the HTTPS proxy when one is set."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    parsed = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    return parsed.hostname or "", port or (443 if parsed.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds (name lookup included)."""
    answered = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.set()
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return answered.is_set()


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Tell huggingface_hub to read its cache only (no request that would wait for the network)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def config_from_timm(reference: nn.Module, source: str) -> Dict[str, Any]:
    """``VisionTransformer`` kwargs equivalent to a timm ``VisionTransformer``, its block variants included (q/k
    norm, ``Mlp``/``SwiGLUPacked``/``SwiGLU`` MLPs, the MLP's norm and activation, registers, layer scale); raises
    ``ConfigError`` naming what this backbone does not implement (pre-norm, parallel or post-norm blocks, RMS norm,
    an attention output norm or gate, other activations, no final norm, ...)."""
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(reference, TimmViT):
        raise ConfigError(f"{source}: {type(reference).__name__} is not a plain timm VisionTransformer")
    block = reference.blocks[0]
    if type(block) is not TimmBlock:
        raise ConfigError(f"{source}: unsupported ViT variant ({type(block).__name__} blocks)")
    embed_dim, norm_eps = reference.embed_dim, getattr(block.norm1, "eps", None)
    attn = block.attn
    mlp_layer, hidden, mlp_problems = _timm_mlp(block.mlp, norm_eps)
    unsupported = [what for what, bad in [
        ("pre-norm", not isinstance(getattr(reference, "norm_pre", nn.Identity()), nn.Identity)),
        ("patch-embedding norm", not isinstance(getattr(reference.patch_embed, "norm", nn.Identity()), nn.Identity)),
        ("no position embedding", reference.pos_embed is None),
        ("final norm", isinstance(reference.norm, nn.Identity)),
        ("norms other than LayerNorm of one eps", not all(_is_layer_norm(norm, norm_eps, optional=optional) for
                                                          norm, optional in ((block.norm1, False), (block.norm2, False),
                                                                             (reference.norm, True)))),
        (f"{type(attn).__name__} attention", not hasattr(attn, "qkv") or not hasattr(attn, "num_heads")),
        ("q/k norm other than a LayerNorm of the blocks' eps", not _is_layer_norm(getattr(attn, "q_norm", None),
                                                                                   norm_eps, optional=True)),
        ("attention output norm", not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)),
        ("gated attention", getattr(attn, "gate", None) is not None),
        ("head width other than width / heads", getattr(attn, "head_dim", 0) * getattr(attn, "num_heads", 0)
         != embed_dim),
        ("projections without bias", getattr(getattr(attn, "proj", None), "bias", None) is None),
    ] if bad] + mlp_problems
    if unsupported:
        raise ConfigError(f"{source}: unsupported ViT variant ({', '.join(unsupported)})")
    heads = [b.attn.num_heads for b in reference.blocks]
    variants = dict(qk_norm=not isinstance(attn.q_norm, nn.Identity), mlp_layer=mlp_layer,
                    act_layer=_timm_activation(block.mlp.act), scale_mlp_norm=not isinstance(block.mlp.norm,
                                                                                                nn.Identity))
    return dict(img_size=list(reference.patch_embed.img_size), patch_size=reference.patch_embed.patch_size[0],
                in_chans=reference.patch_embed.proj.in_channels, embed_dim=embed_dim, depth=len(heads),
                num_heads=heads[0], last_heads=heads[-1] if heads[-1] != heads[0] else None,
                mlp_ratio=mlp_ratio_of(hidden, embed_dim), qkv_bias=attn.qkv.bias is not None,
                layer_scale=1e-5 if hasattr(block.ls1, "gamma") else None, norm_eps=norm_eps,
                class_token=reference.cls_token is not None, num_reg_tokens=reference.num_reg_tokens,
                no_embed_class=reference.no_embed_class,
                **{key: value for key, value in variants.items() if value != VARIANT_DEFAULTS[key]})


def _timm_mlp(mlp: nn.Module, norm_eps: Optional[float]) -> Tuple[str, int, List[str]]:
    """``(mlp_layer, hidden width as timm counts it, what does not fit)`` of a timm ViT block's MLP."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    problems = []
    if type(mlp) is Mlp:
        kind, first = "mlp", mlp.fc1
    elif type(mlp) is GluMlp and not mlp.gate_last:
        kind, first = "swiglu_packed", mlp.fc1
    elif type(mlp) is SwiGLU:
        kind, first = "swiglu", mlp.fc1_g
    else:
        return "mlp", 1, [f"{type(mlp).__name__} MLP" + (" with the gate last" if type(mlp) is GluMlp else "")]
    if not isinstance(first, nn.Linear) or first.bias is None or mlp.fc2.bias is None:
        problems.append("MLP without bias or of convolutions")
    if _timm_activation(mlp.act) is None:
        problems.append(f"{type(mlp.act).__name__} activation")
    if not _is_layer_norm(mlp.norm, norm_eps, optional=True):
        problems.append("MLP norm other than a LayerNorm of the blocks' eps")
    return kind, first.out_features, problems


def _timm_activation(act: nn.Module) -> Optional[str]:
    """The ``ACT_LAYERS`` name of a timm MLP's activation module, ``None`` for one this backbone lacks."""
    from timm.layers.activations import GELU, GELUTanh

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return {GELU: "gelu", GELUTanh: "gelu_tanh", nn.SiLU: "silu"}.get(type(act))


def _is_layer_norm(module: Optional[nn.Module], eps: Optional[float], optional: bool = False) -> bool:
    """True for an affine ``nn.LayerNorm`` of ``eps`` (timm's ``LayerNorm`` is one), or with ``optional`` for
    none (``nn.Identity``)."""
    if optional and (module is None or isinstance(module, nn.Identity)):
        return True
    return (isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.bias is not None
            and module.eps == eps)
