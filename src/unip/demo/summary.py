"""The demo's summary: numbers read back from the files the stages wrote, as a table, JSON, Markdown and a figure.

Every number comes from a file (``profile.json`` of ``unip analyze``, ``log.jsonl`` of ``unip pretrain``,
``metrics.json`` of ``unip finetune`` / ``unip evaluate``) and the summary names the file, so that a reader (and
``tests/test_demo.py``) can check it. ``summary.json`` (format ``unip-demo-summary``, version 1)::

    {"format", "version", "unip_version", "mode": "full" | "fast", "seed", "seconds", "stage_seconds", "threads",
     "teacher": {"file", "cached", "made_seconds", "description", "recipe", "test_mIoU", "metrics", "paper"},
     "layer": {"analyze", "pretrain", "depth", "pattern", "nmi", "reason", "profile"},
     "nmi": {"teacher": [...], "student_before": [...], "student_after": [...], "profile"},
     "distillation": {"log", "before": {"step", "loss"}, "after": {"epoch", "steps", "loss"}, "epochs", "images"},
     "finetune": {"iterations", "train_images", "test_images", "classes",
                  "distilled": {"mIoU", "mAcc", "aAcc", "IoU", "metrics"}, "random_init": {...}, "gain"},
     "evaluate": {"mIoU", "metrics"}, "predictions": {"folder", "images"}, "verdict", "files"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from unip import __version__
from unip.atomic import atomic_write_text
from unip.demo.settings import DemoSettings
from unip.engine.logging import read_records, records_of_last_run
from unip.errors import DataError
from unip.outputs import save_figure

#: The first line of ``summary.md`` (how a later run recognises it as the demo's).
SUMMARY_TITLE = "# unip demo summary"

if TYPE_CHECKING:  # pragma: no cover
    from unip.demo.pipeline import Layout, TeacherInfo, Tour

SUMMARY_FORMAT = "unip-demo-summary"
PAPER_TEACHERS = ("timm:vit_large_patch16_224.mae (MAE-L, layer 18 of 24), DINO-B (layer 9 of 12) or iBOT-L "
                  "(layer 21 of 24), from timm or a checkpoint file (unip pretrain mae-l_unip-s --teacher "
                  "timm:vit_large_patch16_224.mae@FILE)")


# -------------------------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the stage's output ({err})") from err


def read_profile(folder: Path) -> List[Dict[str, Any]]:
    """The per-model entries of ``<folder>/profile.json`` (``unip analyze``), in ``--model`` order."""
    return list(read_json(Path(folder) / "profile.json")["models"])


def last_run_records(log: Path) -> List[Dict[str, Any]]:
    """The records of the newest run in a ``log.jsonl`` (``unip.engine.logging.records_of_last_run``: from the last
    ``setup`` record on, without those a resume superseded)."""
    try:
        records = read_records(log)
    except (OSError, ValueError) as err:
        raise DataError(f"{log}: cannot read the training log ({err})") from err
    return records_of_last_run(records)


def _metrics(path: Path) -> Dict[str, Any]:
    document = read_json(path)
    iou = {name: value for name, value, row in zip(document["classes"], document["IoU"], document["per_class"])
           if row["label_pixels"]}
    return {"mIoU": document["mIoU"], "mAcc": document["mAcc"], "aAcc": document["aAcc"], "IoU": iou,
            "metrics": str(path)}


# -------------------------------------------------------------------------------------------- building
def build_summary(paths: "Layout", settings: DemoSettings, teacher: "TeacherInfo", seed: int,
                  tour: "Tour") -> Dict[str, Any]:
    """The summary document (module docstring) from the files the stages wrote."""
    profile = {Path(entry["source"]).resolve(): entry for entry in read_profile(paths.analysis)}
    teacher_profile = profile[Path(teacher.file).resolve()]
    chosen = read_profile(paths.analysis_teacher)[0]
    records = last_run_records(paths.pretrain / "log.jsonl")
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    setup = next((r for r in records if "teacher_layer" in r), {})
    distilled = _metrics(paths.finetune_distilled / "metrics.json")
    random_init = _metrics(paths.finetune_random / "metrics.json")
    layer = int(chosen["selected_layer"])
    layer_stats = chosen["layers"][layer - 1]
    teacher_test = read_json(teacher.metrics)["mIoU"]
    summary: Dict[str, Any] = {
        "format": SUMMARY_FORMAT, "version": 1, "unip_version": __version__, "mode": settings.name, "seed": seed,
        "threads": torch.get_num_threads(),
        "teacher": {"file": str(teacher.file), "cached": teacher.cached, "made_seconds": teacher.made_seconds,
                    "description": f"demo teacher: {settings.teacher.describe()}",
                    "recipe": {**vars(settings.teacher), "image_size": list(settings.image_size)},
                    "test_mIoU": teacher_test, "metrics": str(teacher.metrics), "paper": PAPER_TEACHERS},
        "layer": {"analyze": layer, "pretrain": setup.get("teacher_layer"), "depth": int(chosen["depth"]),
                  "pattern": layer_stats["pattern"], "nmi": layer_stats["nmi"],
                  "reason": chosen.get("selection_reason"), "profile": str(paths.analysis_teacher / "profile.json")},
        "nmi": {"teacher": _nmi(teacher_profile), "student_before": _nmi(profile[paths.student_random.resolve()]),
                "student_after": _nmi(profile[paths.student.resolve()]),
                "profile": str(paths.analysis / "profile.json")},
        "distillation": {"log": str(paths.pretrain / "log.jsonl"), **loss_before_after(train),
                         "epochs": settings.pretrain_epochs, "images": 2 * settings.unlabeled_per_set},
        "finetune": {"iterations": settings.finetune_iterations, "train_images": settings.labeled_train,
                     "test_images": settings.labeled_test, "distilled": distilled, "random_init": random_init,
                     "gain": distilled["mIoU"] - random_init["mIoU"]},
        "evaluate": {"mIoU": read_json(paths.evaluate / "metrics.json")["mIoU"],
                     "metrics": str(paths.evaluate / "metrics.json")},
        "predictions": {"folder": str(paths.predictions), "images": settings.predict_images},
    }
    summary["verdict"] = verdict(summary)
    summary["stage_seconds"] = tour.finish()
    summary["seconds"] = round(tour.elapsed(), 1)
    summary["files"] = {"json": str(paths.summary_json), "markdown": str(paths.summary_md),
                        "figure": str(paths.summary_png)}
    return summary


def loss_before_after(train: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``before``: the first logged step's loss (``unip pretrain demo`` logs every step, so step 1: the random
    student against the teacher); ``after``: the mean loss over the last epoch's steps (one step's loss is noisy)."""
    last_epoch = train[-1]["epoch"]
    tail = [r["loss"] for r in train if r["epoch"] == last_epoch]
    return {"before": {"step": train[0]["step"], "loss": train[0]["loss"]},
            "after": {"epoch": last_epoch + 1, "steps": len(tail), "loss": sum(tail) / len(tail)}}


def _nmi(entry: Dict[str, Any]) -> List[float]:
    return [float(layer["nmi"]) for layer in entry["layers"]]


def verdict(summary: Dict[str, Any]) -> str:
    """One honest sentence on the comparison (and a warning for ``--fast``)."""
    gain = summary["finetune"]["gain"]
    ft = summary["finetune"]
    if gain > 0:
        text = (f"NMI-HAD helped: the distilled student reaches {ft['distilled']['mIoU']:.2f} mIoU, "
                f"{gain:.2f} more than the same student fine-tuned from its random initial weights "
                f"({ft['random_init']['mIoU']:.2f}) with the same schedule and seed.")
    else:
        text = (f"NMI-HAD did NOT help in this run: the distilled student reaches {ft['distilled']['mIoU']:.2f} "
                f"mIoU, {-gain:.2f} less than or equal to the same student fine-tuned from its random initial "
                f"weights ({ft['random_init']['mIoU']:.2f}) with the same schedule and seed.")
    text += (" One seed only: see docs/demo.md for the gap over several seeds, and rerun with --seed N to see the "
             "spread.")
    if summary["mode"] == "fast":
        text += " --fast is too short for this comparison to mean much; run `unip demo` for the full schedule."
    return text


# -------------------------------------------------------------------------------------------- writing
def format_table(summary: Dict[str, Any]) -> str:
    """The printed summary (plain text, also the body of ``summary.md``)."""
    teacher, layer, nmi, dist, ft = (summary[k] for k in ("teacher", "layer", "nmi", "distillation", "finetune"))
    where = "reused from the cache" if teacher["cached"] else f"made in this run in {teacher['made_seconds']:.0f} s"
    lines = [
        f"mode {summary['mode']}, seed {summary['seed']}, {summary['seconds']:.0f} s on the CPU "
        f"({summary['threads']} threads)",
        "",
        f"teacher      {teacher['description']}; test mIoU {teacher['test_mIoU']:.2f} on its own generated "
        f"test images; {where}: {teacher['file']}",
        f"             the paper distils real RGB-pretrained teachers instead: {teacher['paper']}",
        f"layer        {layer['analyze']} of {layer['depth']} ({layer['pattern']}, NMI {layer['nmi']:.3f}; "
        f"{layer['reason']}) chosen by unip analyze; unip pretrain --teacher-layer auto chose {layer['pretrain']}",
        f"distillation KL loss {dist['before']['loss']:.4f} at step {dist['before']['step']} → "
        f"{dist['after']['loss']:.4f} (mean of the last epoch's {dist['after']['steps']} steps; {dist['epochs']} "
        f"epochs of {dist['images']} unlabeled images)",
        "",
        _nmi_table(nmi, layer["analyze"]),
        "",
        f"fine-tuning  LL-FPN + UperNet, {ft['iterations']} iterations on {ft['train_images']} labeled images, "
        f"test split of {ft['test_images']} images",
        _miou_table(ft),
        "",
        f"unip evaluate of the distilled student's best model: mIoU {summary['evaluate']['mIoU']:.2f}",
        "",
        summary["verdict"],
    ]
    return "\n".join(lines)


def _nmi_table(nmi: Dict[str, Any], chosen: int) -> str:
    depth = max(len(nmi["teacher"]), len(nmi["student_before"]))
    rows = [("NMI per layer", [str(i + 1) for i in range(depth)])]
    for name, key in (("teacher", "teacher"), ("student before", "student_before"),
                      ("student after", "student_after")):
        cells = [f"{v:.3f}" + ("*" if key == "teacher" and i + 1 == chosen else "") for i, v in enumerate(nmi[key])]
        rows.append((name, cells))
    return "\n".join(f"{name:<16}" + "".join(f"{c:>8}" for c in cells) for name, cells in rows) + (
        "\n(* the distilled teacher layer; the student learns it in its last block)")


def _miou_table(ft: Dict[str, Any]) -> str:
    classes = list(ft["distilled"]["IoU"])
    header = f"{'':<22}{'mIoU':>7}{'mAcc':>7}{'aAcc':>7}  " + "".join(f"{c[:9]:>10}" for c in classes)
    lines = [header]
    for name, key in (("distilled (NMI-HAD)", "distilled"), ("random init", "random_init")):
        row = ft[key]
        cells = "".join(f"{_cell(row['IoU'].get(c)):>10}" for c in classes)
        lines.append(f"{name:<22}{row['mIoU']:>7.2f}{row['mAcc']:>7.2f}{row['aAcc']:>7.2f}  {cells}")
    lines.append(f"{'gain':<22}{ft['gain']:>+7.2f}")
    lines.append(f"{'':<22}(per-class columns: test IoU)")
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_summary(summary: Dict[str, Any], paths: "Layout") -> str:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` (atomically); returns the table (``format_table``)."""
    table = format_table(summary)
    atomic_write_text(paths.summary_json, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(paths.summary_md, f"{SUMMARY_TITLE}\n\n```\n{table}\n```\n\n![summary](summary.png)\n")
    write_figure(summary, paths.summary_png, overlay=_first_overlay(paths.predictions))
    return table


def _first_overlay(folder: Path) -> Optional[Path]:
    overlays = sorted((folder / "overlay").rglob("*.png")) if (folder / "overlay").is_dir() else []
    return overlays[0] if overlays else None


def write_figure(summary: Dict[str, Any], path: Path, overlay: Optional[Path] = None) -> None:
    """``summary.png``: NMI per layer, the distillation loss curve, mIoU distilled vs random init, a prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _plot_nmi(axes[0][0], summary)
    _plot_loss(axes[0][1], summary)
    _plot_miou(axes[1][0], summary)
    _plot_overlay(axes[1][1], overlay)
    ft = summary["finetune"]
    figure.suptitle(f"unip demo ({summary['mode']}, seed {summary['seed']}): distilled student "
                    f"{ft['distilled']['mIoU']:.2f} mIoU, same student from random init "
                    f"{ft['random_init']['mIoU']:.2f} ({ft['gain']:+.2f})", fontsize=10)
    figure.tight_layout()
    save_figure(figure, str(path))
    plt.close(figure)


def _plot_nmi(ax, summary: Dict[str, Any]) -> None:
    nmi, chosen = summary["nmi"], summary["layer"]["analyze"]
    for key, label, style in (("teacher", "teacher", "o-"), ("student_before", "student before", "s--"),
                              ("student_after", "student after distillation", "s-")):
        values = nmi[key]
        ax.plot(range(1, len(values) + 1), values, style, label=label)
    ax.plot([chosen], [nmi["teacher"][chosen - 1]], "*", markersize=16, color="gold", markeredgecolor="k",
            label=f"distilled teacher layer {chosen}")
    student_last = len(nmi["student_after"])
    ax.annotate("", xy=(student_last, nmi["student_after"][-1]), xytext=(chosen, nmi["teacher"][chosen - 1]),
                arrowprops=dict(arrowstyle="->", color="gray"))
    ax.set(xlabel="layer", ylabel="NMI (head mean)", title="attention pattern per layer (unip analyze)")
    ax.legend(fontsize=8)


def _plot_loss(ax, summary: Dict[str, Any]) -> None:
    records = last_run_records(Path(summary["distillation"]["log"]))
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="KL(teacher ‖ student), per attention row",
           title="NMI-HAD distillation loss (pretrain/log.jsonl)")


def _plot_miou(ax, summary: Dict[str, Any]) -> None:
    ft = summary["finetune"]
    classes = list(ft["distilled"]["IoU"])
    groups = ["mIoU"] + classes
    width = 0.38
    for offset, key, label in ((-width / 2, "distilled", "distilled (NMI-HAD)"),
                               (width / 2, "random_init", "random init")):
        values = [ft[key]["mIoU"]] + [ft[key]["IoU"][c] or 0.0 for c in classes]
        ax.bar([i + offset for i in range(len(groups))], values, width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, fontsize=8)
    ax.set(ylabel="test IoU (%)", title=f"fine-tuned, same schedule and seed: gain {ft['gain']:+.2f} mIoU")
    ax.legend(fontsize=8)


def _plot_overlay(ax, overlay: Optional[Path]) -> None:
    ax.axis("off")
    if overlay is None:
        return
    from PIL import Image

    with Image.open(overlay) as image:
        ax.imshow(image.convert("RGB"))
    ax.set_title(f"unip predict: {os.path.basename(overlay)}", fontsize=9)


__all__ = ["SUMMARY_FORMAT", "build_summary", "format_table", "last_run_records", "read_profile", "verdict",
           "write_figure", "write_summary"]

