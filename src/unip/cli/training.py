"""``unip pretrain`` and ``unip finetune``: each verb's options and the config keys they set, the options every
training verb shares. The run folder is checked by the library (``unip.engine.run_folder``) before any work."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Tuple

from unip.cli.app import SEED, TableChoices
from unip.engine.config import dump_config, integer, list_presets
from unip.errors import ConfigError


#: CLI options of ``unip pretrain`` and the config keys they set (``--set`` reaches every other key).
_PRETRAIN_OPTIONS = {
    "teacher": "teacher.source", "teacher_layer": "teacher.layer", "student": "student.model",
    "data": "data.path", "out": "run.output", "epochs": "optim.epochs", "batch_size": "optim.batch_size",
    "accum_iter": "optim.accum_iter", "blr": "optim.blr", "device": "run.device",
    "precision": "run.precision", "resume": "run.resume", "seed": "run.seed", "workers": "data.num_workers",
    "teacher_precision": "run.teacher_precision", "teacher_gelu": "run.teacher_gelu",
}


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="NMI-HAD: distil a teacher's hybrid-layer attention into a UNIP student",
                       description="Distil the attention logits of a frozen teacher's block into the last "
                                   "block of a UNIP student. Settings come from a preset (configs/pretrain/"
                                   "<name>.yaml or a YAML file), then the options below, then --set. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m unip.cli pretrain ...")
    p.add_argument("preset", nargs="?",
                   help=f"preset name ({', '.join(list_presets('pretrain'))}) or a YAML file")
    p.add_argument("--teacher", metavar="SOURCE", help="teacher checkpoint file or timm:<name>[@file]")
    p.add_argument("--teacher-layer", metavar="N|auto", type=_layer_arg,
                   help="1-based teacher block to distil, or auto (NMI-guided choice)")
    p.add_argument("--student", metavar="MODEL", help="student preset, e.g. unip_vit_small_patch16")
    p.add_argument("--data", metavar="PATH", help="pack folder, manifest file, or folder of images")
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints/, log.jsonl, tb/, student.safetensors")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process and micro-batch")
    p.add_argument("--accum-iter", type=int, help="micro-batches per optimiser step")
    p.add_argument("--blr", type=float, help="base lr; lr = blr × effective batch / 256")
    p.add_argument("--compile", dest="compile", action="store_const", const=True,
                   help="torch.compile teacher, student and loss (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="run eagerly")
    p.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16", "fp8"],
                   help="teacher weights: auto (bf16 in bf16 runs), fp32, bf16, or fp8 (torchao, Ada/Hopper GPUs)")
    p.add_argument("--teacher-gelu", choices=["exact", "tanh"],
                   help="the teacher's GELU: exact (default) or the tanh approximation, which a bf16 teacher on "
                        "CUDA computes inside its fc1 products (logits move 40x less than bf16 storage moves them)")
    _add_training_options(p, "auto: bf16 (else fp16) autocast on CUDA, fp32 on CPU; bf16 is honoured on CPUs too "
                             "(fast with AVX512-BF16/AMX); fp16 on a CPU runs fp32, with a warning",
                          "optim.clip_grad=1.0")
    p.set_defaults(func=_run_pretrain)


def _add_training_options(p: argparse.ArgumentParser, precision_help: str, set_example: str) -> None:
    """Options every training verb has: device, precision, resume, seed, workers, --set, --print-config."""
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help=precision_help)
    p.add_argument("--resume", metavar="PATH|auto", help="training state to continue from; auto = latest in --out")
    p.add_argument("--seed", type=SEED)
    p.add_argument("--workers", type=integer(0, 256).option(), help="data-loader worker processes per rank")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any setting, e.g. --set {set_example} (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")


def _option_values(args: argparse.Namespace, options: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(config values, where each came from)`` of the CLI options in ``options`` (option → dotted key)."""
    values = {key: getattr(args, name) for name, key in options.items() if getattr(args, name) is not None}
    origins = {key: "--" + name.replace("_", "-") for name, key in options.items()}
    return values, origins


def _layer_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block number (1 = first) or auto, got {text!r}") from None


def _run_pretrain(args: argparse.Namespace) -> int:
    from unip.distill.train import DEFAULTS, make_config, train

    values, origins = _option_values(args, _PRETRAIN_OPTIONS)
    if args.compile is not None:
        values["run.compile"] = args.compile
    origins["run.compile"] = "--compile/--no-compile"
    sources: Dict[str, str] = {}
    config = make_config(args.preset, tuple(args.overrides), values, origins=origins, sources=sources)
    if args.print_config:
        print(dump_config(config, sources, DEFAULTS), end="")
        return 0
    result = train(config)
    if result.is_main:  # under torchrun: one line, not one per rank
        print(f"pre-training finished after {result.steps} steps (loss {result.last_loss:.4g}); "
              f"student: {result.student}")
    return 0


# ------------------------------------------------------------------------------------- finetune
#: CLI options of ``unip finetune`` and the config keys they set (``--set`` reaches every other key).
_FINETUNE_OPTIONS = {
    "pretrained": "model.pretrained", "data": "data.path", "dataset": "data.dataset", "out": "run.output",
    "probe_layer": "model.probe_layer", "head": "model.head", "neck": "model.neck", "iterations": "optim.iterations",
    "batch_size": "optim.batch_size", "device": "run.device", "precision": "run.precision", "resume": "run.resume",
    "seed": "run.seed", "workers": "data.num_workers",
}


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a backbone for segmentation (LL-FPN + UperNet), or probe it",
                       description="Fine-tune a pre-trained ViT with LL-FPN + UperNet (+ FCN auxiliary head) on a "
                                   "segmentation data set with the release's recipe, or train a linear probe on "
                                   "its frozen features (--probe linear, --probe-layer N). Evaluates every "
                                   "run.eval_every steps by sliding windows, keeps checkpoints/best.safetensors by "
                                   "val mIoU, writes segmentor.safetensors (final) and metrics.json (best model on "
                                   "the test split). Settings: preset (configs/finetune/<name>.yaml, or "
                                   "configs/linprobe/ with --probe; or a YAML file), then the options, then --set. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m unip.cli finetune ...")
    p.add_argument("preset", nargs="?", help=f"preset ({', '.join(list_presets('finetune'))}; with --probe: "
                                             f"{', '.join(list_presets('linprobe'))}) or a YAML file (default: the "
                                             "SODA / UNIP-S recipe)")
    p.add_argument("--pretrained", metavar="SOURCE",
                   help="backbone: our pretrain output, a release/MAE/DINO/iBOT/DeiT checkpoint, timm:NAME[@FILE], "
                        "or none (random initialisation of the preset's model.backbone)")
    p.add_argument("--data", metavar="ROOT", help="data set root (see unip data check-seg)")
    p.add_argument("--dataset", choices=TableChoices("unip.data.datasets:DATASETS", "auto"),
                   help="layout of --data (default: the preset's)")
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints/, log.jsonl, tb/, segmentor.safetensors, "
                                                "metrics.json")
    p.add_argument("--head", choices=TableChoices("unip.models.heads:HEADS"),
                   help="decode head (default: the preset's; the recipe: upernet)")
    p.add_argument("--neck", choices=TableChoices("unip.models.necks:NECKS"),
                   help="neck of a head that reads a pyramid (default: the preset's; the recipe: llfpn)")
    p.add_argument("--probe", choices=TableChoices("unip.models.heads:probe_heads"),
                   help="probing: frozen backbone, blocks 4/6/8/12 → the probe head (linear: one 1×1 conv; presets "
                        "from configs/linprobe/)")
    p.add_argument("--probe-layer", metavar="N", type=integer(1, 256).option(),
                   help="layer-wise probing: block N alone (implies --probe linear unless --probe names another)")
    p.add_argument("--iterations", type=integer(1).option(), help="optimiser steps (optim.iterations)")
    p.add_argument("--batch-size", type=integer(1).option(), help="images per GPU and micro-batch")
    p.add_argument("--check-data", action="store_true",
                   help="decode every image and label of train/val/test first and list every problem")
    _add_training_options(p, "auto: bf16 (else fp16) autocast on CUDA (the recipe: fp16), fp32 on CPU; bf16 is "
                             "honoured on CPUs too", "model.last_block_heads=default")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from unip.models.heads import HEADS, probe_heads
    from unip.seg.train import DEFAULTS, finetune, make_config

    values, origins = _option_values(args, _FINETUNE_OPTIONS)
    if args.probe and args.head and args.head != args.probe:
        raise ConfigError(f"--head {args.head} and --probe {args.probe} ask for two heads; drop one of them")
    head = args.probe or args.head or (probe_heads()[0] if args.probe_layer is not None else None)
    probe = head if head in probe_heads() else None
    if args.probe_layer is not None and not probe:
        raise ConfigError(f"--probe-layer probes one block, but --head {head} fine-tunes; drop one of them")
    if head:
        values["model.head"], origins["model.head"] = head, "--probe" if args.probe else "--head"
    if args.check_data:
        values["data.check"], origins["data.check"] = True, "--check-data"
    sources: Dict[str, str] = {}
    config = make_config(args.preset, tuple(args.overrides), values, origins=origins,
                         kind="linprobe" if probe else "finetune", sources=sources)
    if head and config["model"]["head"] != head:
        option = "--probe" if args.probe else "--head" if args.head else "--probe-layer"
        raise ConfigError(f"{option} trains a {head} {'probe' if probe else 'head'}, but --set "
                          f"model.head={config['model']['head']} asks for another head; drop one of them")
    if args.print_config:
        print(dump_config(config, sources, DEFAULTS), end="")
        return 0
    result = finetune(config)
    if result.is_main:
        print(result.table)
        best = f"best val {result.best['metric']} {result.best['value']:.2f} at step {result.best['step']}; " \
            if result.best else "no evaluation chose a best model; "
        tested = "the best model" if result.best else "the final model"
        print(f"{'probing' if HEADS[config['model']['head']].probe else 'fine-tuning'} finished after {result.steps} "
              f"steps; {best}final model: {result.segmentor}; test metrics of {tested}: {result.metrics_file}")
    return 0
