"""Hostile input over every verb (issue #13): bad files, bad options, bad output folders.

Each row of ``CASES`` is one command line built from files this module makes. Every row must end with its
documented exit code (README "Errors and exit codes"); a failing row prints exactly one line on stderr
(``unip ...: error: ...``) that matches the row's pattern, and no row prints a traceback. Before and after
each row every file under the shared inputs and the row's own folder is hashed: no file that existed may
change or vanish (so a user folder given as ``--out`` stays intact), and new files may appear only under
the row's output folder ``a.out``.

How to add a row (e.g. for a new verb): append ``Case(id, argv, code=2, match=..., setup=None)`` to
``CASES``. ``argv`` is a function of the row's ``Inputs`` (``a``) that returns the arguments after
``unip``: use the shared inputs (``a.teacher``, ``a.images``, ``a.manifest``, ``a.pack``, ...), make
files of your own with ``a.file(name, content)`` / ``a.folder(name, {file: content})`` (in the row's
scratch folder, checked for changes like everything else), and write outputs under ``a.out`` (an empty
folder that exists). ``match`` is a regular expression that the stderr line must contain (name the file or
option at fault); ``code`` 0 rows must succeed with an empty stderr, or with exactly one warning line matching
``warn``. ``setup(a)`` may prepare more (it gets ``a.monkeypatch``, and ``a.stack`` for what must last until the
row is checked: a lock held by another process). ``takes_over`` rows find a killed run's lock in their output
folder, which the verb may replace. Rows run in-process (``unip.cli.main``), so keep each one fast: fail before
the work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unip.checkpoint import save_checkpoint
from unip.cli import main
from unip.data.infmix import build_manifest
from unip.distill.train import DEFAULTS as PRETRAIN_DEFAULTS
from unip.engine.config import dump_config
from unip.data.packed import pack_manifest
from unip.data.synth import write_soda
from unip.models import Segmentor, create_model
from unip.seg import build_segmentor, save_segmentor
from unip.seg.train import DEFAULTS as SEG_DEFAULTS

from locks import held_lock, stale_lock  # noqa: E402  (a folder's lock held by another process, live or killed)
from test_seg_model import release_state_dict  # noqa: E402  (the release's fine-tuned layout, random weights)

ODD_NAMES = ("odd\udcffbyte.png", "new\nline.png", "sp ace.png")  # a non-UTF-8 byte, a newline, a space


# ============================================================================================ inputs
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Inputs every row may read (never write): a tiny teacher, images, a manifest and a pack, and the same
    with odd file names."""
    root = tmp_path_factory.mktemp("hostile_inputs")
    torch.manual_seed(0)
    teacher = create_model("vit_small_patch16", depth=2, embed_dim=32, num_heads=2, img_size=32)
    save_checkpoint(teacher, root / "teacher.safetensors")
    rng = np.random.default_rng(0)
    for folder, names in (("infrared/setA/thermal", [f"img{i}.png" for i in range(4)]),
                          ("odd/set\udcfeB/thermal", list(ODD_NAMES))):
        os.makedirs(root / folder)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(root / folder / name)
    build_manifest(str(root / "manifest.jsonl"), infrared=str(root / "infrared"), workers=1)
    build_manifest(str(root / "odd.jsonl"), infrared=str(root / "odd"), workers=1)
    pack_manifest(str(root / "manifest.jsonl"), str(root / "pack"), short_side=32, workers=1)
    write_soda(str(root / "soda"), 4, 2, size=(48, 40), seed=0)
    save_segmentor(build_segmentor(21, str(root / "teacher.safetensors"), img_size=32, channels=16),
                   root / "segmentor.safetensors")
    torch.save({"meta": {}, "state_dict": release_state_dict(32, 2, 9, grid=2, channels=16, aux_channels=8)},
               root / "release_mfnet.pth")
    save_segmentor(Segmentor({"backbone": dict(img_size=64, embed_dim=32, depth=1, num_heads=2, layer_scale=1.0),
                              "feature_layers": [1], "neck": "llfpn", "num_classes": 3, "auxiliary_head": None,
                              "decode_head": {"type": "upernet", "channels": 8, "pool_scales": [1, 2, 3, 6]}},
                             {"crop_size": 64, "stride": 42}), root / "tiny_segmentor.safetensors")
    (root / "state_run").mkdir()
    inputs = Inputs(root, root / "state_run", None)
    assert main(inputs.pretrain("--epochs", "1", "--teacher-layer", "2")) == 0  # a real training state to damage
    return root


class Inputs:
    """What a row's ``argv`` sees: shared inputs, a scratch folder for its own files, and ``out``."""

    def __init__(self, shared: Path, case_dir: Path, monkeypatch) -> None:
        self.root = shared
        self.teacher = str(shared / "teacher.safetensors")
        self.images = str(shared / "infrared" / "setA" / "thermal")
        self.infrared = str(shared / "infrared")
        self.manifest = str(shared / "manifest.jsonl")
        self.pack = str(shared / "pack")
        self.odd_images = str(shared / "odd" / "set\udcfeB" / "thermal")
        self.odd_manifest = str(shared / "odd.jsonl")
        self.labeled = str(shared / "soda")
        self.segmentor = str(shared / "segmentor.safetensors")
        self.release_mfnet = str(shared / "release_mfnet.pth")
        self.tiny_segmentor = str(shared / "tiny_segmentor.safetensors")
        self.scratch = case_dir / "scratch"
        self.out = case_dir / "out"
        self.monkeypatch = monkeypatch
        self.stack = contextlib.ExitStack()
        self.scratch.mkdir()
        self.out.mkdir()

    def file(self, name: str, content=b"") -> str:
        """Write ``content`` (bytes or text) to ``scratch/name``; returns the path."""
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
        return str(path)

    def folder(self, name: str, files: Optional[Dict[str, object]] = None) -> str:
        """Make ``scratch/name`` holding ``files`` (name → bytes or text); returns the path."""
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        for inner, content in (files or {}).items():
            self.file(f"{name}/{inner}", content)
        return str(path)

    def out_with(self, name: str, files: Dict[str, object]) -> str:
        """A user's folder ``out/name`` holding ``files``: given as ``--out`` it must stay intact."""
        path = self.out / name
        for inner, content in files.items():
            target = path / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def live_lock(self, folder: Path, command: str = "unip finetune") -> None:
        """``folder``'s lock held by another running process until the row is checked."""
        self.stack.enter_context(held_lock(folder, command))

    def fifo(self, name: str) -> str:
        """A FIFO at ``scratch/name`` (reading it would wait for a writer); returns the path."""
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return str(path)

    # ----------------------------------------------------------------------------- checkpoints
    def teacher_state(self) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.teacher)

    def checkpoint(self, name: str, state: Optional[Dict[str, torch.Tensor]] = None,
                   model: Optional[object] = None, raw_metadata: Optional[str] = None) -> str:
        """A safetensors file with the teacher's tensors (or ``state``) and our metadata, where ``model``
        replaces the architecture (a dict, or any JSON value) or ``raw_metadata`` the whole document."""
        from safetensors import safe_open

        with safe_open(self.teacher, framework="pt") as handle:
            document = json.loads(handle.metadata()["unip.config"])
        if model is not None:
            document["model"] = model if not isinstance(model, dict) else {**document["model"], **model}
        header = raw_metadata if raw_metadata is not None else json.dumps(document)
        path = str(self.scratch / name)
        save_file(state if state is not None else self.teacher_state(), path, metadata={"unip.config": header})
        return path

    def damaged_state(self, name: str, **changes: object) -> str:
        """The shared pre-training run's training state with ``changes`` (key → value; ``rng_torch`` replaces
        ``rng["torch"]``), saved as ``scratch/name``; returns the path."""
        state = torch.load(sorted((self.root / "state_run" / "out" / "run" / "checkpoints").glob("step-*.pt"))[-1],
                           weights_only=True)
        if "rng_torch" in changes:
            state["rng"]["torch"] = changes.pop("rng_torch")
        state.update(changes)
        return self.torch_file(name, state)

    def plain(self, name: str, state: Dict[str, torch.Tensor]) -> str:
        """A safetensors file without metadata (the architecture is inferred from key names and shapes)."""
        path = str(self.scratch / name)
        save_file(state, path)
        return path

    def torch_file(self, name: str, content: object) -> str:
        path = str(self.scratch / name)
        torch.save(content, path)
        return path

    # ----------------------------------------------------------------------------- command lines
    def pretrain(self, *extra: str, data: Optional[str] = None, out: Optional[str] = None) -> List[str]:
        """A toy pre-training run on the shared inputs: 1-block student of width 32, batch 2."""
        return ["pretrain", "toy", "--teacher", self.teacher, "--data", data or self.pack, "--out",
                out or str(self.out / "run"), "--device", "cpu", "--batch-size", "2", "--set", "student.depth=1",
                "--set", "student.embed_dim=32", "--set", "student.num_heads=2", "--set", "run.progress=false",
                *extra]

    def finetune(self, *extra: str, data: Optional[str] = None, out: Optional[str] = None,
                 pretrained: Optional[str] = None) -> List[str]:
        """A one-step toy fine-tuning run of the teacher (width 32) on the labeled set: 32 px crops, batch 2."""
        return ["finetune", "toy", "--pretrained", pretrained or self.teacher, "--data", data or self.labeled,
                "--out", out or str(self.out / "ft"), "--device", "cpu", "--iterations", "1", "--batch-size", "2",
                "--set", "data.crop_size=32", "--set", "data.scale=[128, 32]", "--set", "model.channels=16",
                "--set", "optim.warmup_iterations=0", "--set", "run.eval_every=0", "--set", "run.progress=false",
                *extra]

    def evaluate(self, *extra: str, checkpoint: Optional[str] = None, data: Optional[str] = None,
                 out: Optional[str] = None) -> List[str]:
        return ["evaluate", "--checkpoint", checkpoint or self.segmentor, "--data", data or self.labeled, "--out",
                out or str(self.out / "eval"), "--device", "cpu", "--no-progress", "--workers", "0", "--overlays",
                "1", *extra]

    def labeled_copy(self, damage: Callable[[Path], None]) -> str:
        """A copy of the labeled set in the scratch folder, damaged by ``damage(root)``."""
        copy = self.scratch / "soda"
        shutil.copytree(self.labeled, copy)
        damage(copy)
        return str(copy)

    def predict(self, *extra: str, inputs: Optional[List[str]] = None, out: Optional[str] = None,
                checkpoint: Optional[str] = None) -> List[str]:
        """A prediction on one shared image (``inputs`` replaces it) with the tiny segmentor."""
        return ["predict", "--checkpoint", checkpoint or self.tiny_segmentor, *(inputs or [self.images + "/img0.png"]),
                "--out", out or str(self.out / "pred"), "--no-progress", *extra]

    def export(self, *extra: str, checkpoint: Optional[str] = None, out: Optional[str] = None) -> List[str]:
        return ["export", "--checkpoint", checkpoint or self.tiny_segmentor, "--out", out or str(self.out / "seg.onnx"),
                *extra]

    def bench(self, *extra: str, checkpoint: Optional[str] = None) -> List[str]:
        return ["bench", "--checkpoint", checkpoint or self.tiny_segmentor, "--no-compile", "--iters", "1", *extra]

    def sweep_file(self, name: str = "s.yaml", **changes) -> str:
        """A small sweep file (a random-init ViT-T on the labeled set, fine-tuning) with ``changes`` to its
        top-level entries; returns its path."""
        import yaml

        document = {"name": "t", "preset": "toy", "backbones": [{"name": "A", "size": "tiny", "source": "none"}],
                    "datasets": [{"name": "D", "root": self.labeled, "layout": "soda"}], "protocols": {"ft": {}},
                    **changes}
        return self.file(name, yaml.safe_dump(document))

    def sweep(self, *extra: str, sweep: Optional[str] = None, out: Optional[str] = None) -> List[str]:
        return ["sweep", "run", sweep or self.sweep_file(), "--out", out or str(self.out / "sweep"), *extra]

    def sweep_folder(self, name: str = "sweep_dir") -> str:
        """A sweep folder whose one cell failed (its ``sweep.json`` as ``unip sweep run`` writes it)."""
        from unip.sweep import read_sweep
        from unip.sweep.state import write_state

        folder = self.scratch / name
        job = {"kind": "cell", "folder": "cells/a/d/ft-seed0", "backbone": "A", "dataset": "D", "protocol": "ft",
               "layer": None, "seed": 0, "status": "failed", "error": "unip finetune: error: boom", "runs": 1}
        write_state(folder, {"sweep": read_sweep(self.sweep_file("state.yaml")).to_dict(),
                             "jobs": {"a/d/ft-seed0": job}})
        return str(folder)

    def analyze(self, *extra: str, images: Optional[str] = None, out: Optional[str] = None) -> List[str]:
        return ["analyze", "--model", self.teacher, "--images", images or self.images, "--out",
                out or str(self.out / "analysis"), "--num-images", "2", "--no-progress", *extra]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _truncated(a: Inputs) -> str:
    data = Path(a.teacher).read_bytes()
    return a.file("truncated.safetensors", data[: len(data) // 2])


def _with(state: Dict[str, torch.Tensor], **changes) -> Dict[str, torch.Tensor]:
    state = dict(state)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return state


def _damaged_pack(a: Inputs, damage: Callable[[Path], None]) -> str:
    copy = a.scratch / "pack"
    shutil.copytree(a.pack, copy)
    damage(copy)
    return str(copy)


def _truncate_shard(pack: Path) -> None:
    shard = pack / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])


def _bad_label_values(root: Path) -> None:
    """Every label gets a pixel of value 30 (SODA has ids 0..20 and 255)."""
    for path in (root / "SegmentationClassPNG").glob("*.png"):
        label = np.array(Image.open(path))
        label[0, 0] = 30
        Image.fromarray(label).save(path)


def _label_of_another_size(root: Path) -> None:
    path = sorted((root / "SegmentationClassPNG").glob("*.png"))[-1]  # a test image
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(path)


def _segmentor_with(a: Inputs, name: str, meta: Optional[dict] = None, model: Optional[dict] = None,
                    **changes) -> str:
    """The tiny segmentor's weights under a header whose ``segmentor`` entries are changed (``None`` drops one),
    whose backbone (``model``) entries are updated with ``model`` and whose top-level (meta) entries with
    ``meta``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(a.tiny_segmentor, framework="pt") as handle:
        metadata = dict(handle.metadata())
    document = json.loads(metadata["unip.config"])
    document.update(meta or {})
    document["model"].update(model or {})
    document["segmentor"].update(changes)
    document["segmentor"] = {key: value for key, value in document["segmentor"].items() if value is not None}
    path = str(a.scratch / name)
    save_file(load_file(a.tiny_segmentor), path, metadata={**metadata, "unip.config": json.dumps(document)})
    return path


def _folder_set(a: Inputs, classes_yaml: str = "") -> str:
    """A generic folder data set (images/ + labels/ + classes.yaml, 3 classes, and ``classes_yaml`` added to that
    file) that SCUT's layout also reads."""
    rng = np.random.default_rng(0)
    files: Dict[str, object] = {"classes.yaml": "classes: [background, wall, floor]\n" + classes_yaml}
    for split, names in (("train", ["a", "b"]), ("val", ["c"]), ("test", ["c"])):
        files[f"{split}.txt"] = "".join(f"{name}\n" for name in names)
        for name in names:
            files[f"images/{name}.png"] = _png(rng.integers(0, 256, (40, 48), dtype=np.uint8))
            files[f"labels/{name}.png"] = _png(rng.integers(0, 3, (40, 48), dtype=np.uint8))
    return a.folder("folder_set", files)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _offline_hub(a: Inputs) -> None:
    from huggingface_hub import constants

    a.monkeypatch.setattr(constants, "ENDPOINT", "https://unip-offline-test.invalid")
    a.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    a.monkeypatch.setattr("unip.checkpoint.timm_hub._hub_cached", lambda *args: False)


def _read_only_out(a: Inputs) -> None:
    """``a.out`` (and everything below it) reads as not writable, as on a read-only file system (the tests run
    as root too, where permission bits do not stop a write)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        inside = os.path.abspath(path) == str(a.out) or os.path.abspath(path).startswith(str(a.out) + os.sep)
        return False if inside and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    a.monkeypatch.setattr(os, "access", access)


def _appended(split_file: str, line: str) -> Callable[[Path], None]:
    """A damage for ``labeled_copy``: ``line`` added to the data set's ``split_file``."""
    def damage(root: Path) -> None:
        with open(root / split_file, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return damage


def _fifo_image(root: Path) -> None:
    """The first training image of the data set replaced by a FIFO of its name (reading it would block)."""
    name = (root / "train_infrared.txt").read_text().split()[0]
    image = root / "JPEGImages" / f"{name}.jpg"
    image.unlink()
    os.mkfifo(image)


def _split_bias(a: Inputs, name: str, halves: str = "q", v_length: int = 32) -> str:
    """The teacher with block 0's ``attn.qkv.bias`` split BEiT-style into ``q_bias`` / ``v_bias``, keeping only
    ``halves`` (``q``, ``v`` or ``qv``; ``v_bias`` of ``v_length``)."""
    state = a.teacher_state()
    bias = state.pop("blocks.0.attn.qkv.bias")
    if "q" in halves:
        state["blocks.0.attn.q_bias"] = bias[:32].clone()
    if "v" in halves:
        state["blocks.0.attn.v_bias"] = bias[-v_length:].clone()
    return a.plain(name, state)


def _release(a: Inputs, name: str, meta: Optional[dict] = None, **extra: torch.Tensor) -> str:
    """The shared release file's layout (9 classes, width 32) with ``meta`` and ``extra`` weights (``__`` → ``.``)."""
    state = release_state_dict(32, 2, 9, grid=2, channels=16, aux_channels=8)
    state.update({key.replace("__", "."): value for key, value in extra.items()})
    return a.torch_file(name, {"meta": meta or {}, "state_dict": state})


def _scut_raw(a: Inputs, train: str, labels: bool = True) -> str:
    """A SCUT-Seg download in name only whose ``scut_train.txt`` reads ``train``."""
    return a.folder("scut_raw", {"images/a.jpg": IMAGE_PNG, **({"a_labelIds.png": IMAGE_PNG} if labels else {}),
                                 "scut_train.txt": train, "scut_val.txt": "images/a.jpg\n"})


#: A segmentor header that describes a model ~1,000x larger than its tensors (every value within the bounds).
HUGE_BACKBONE = {"embed_dim": 8192, "depth": 256, "num_heads": 64, "img_size": [4096, 4096]}
LIVE = r"in use by unip {} \(pid \d+ on [^,]+, started \d{{4}}-[^)]+\); wait for it to finish"
STALE = r"took over the lock of unip {} \(pid \d+ on .*\): it ended without releasing it"


# ============================================================================================ the table
@dataclass
class Case:
    id: str
    argv: Callable[[Inputs], List[str]]
    code: int = 2
    match: str = ""
    setup: Optional[Callable[[Inputs], None]] = None
    warn: str = ""
    takes_over: bool = False


IMAGE_PNG = b"\x89PNG\r\n\x1a\n broken"
USER_FILES = {"notes.txt": "my notes", "photos/a.jpg": b"\xff\xd8 not really a jpeg"}
#: An MFNet download in name only: split files listing one frame, a broken 4-channel PNG.
MFNET_RAW = {"train.txt": "00001D\n", "val.txt": "00001D\n", "test.txt": "00001D\n",
             "images/00001D.png": IMAGE_PNG, "labels/00001D.png": IMAGE_PNG}

CASES: List[Case] = [
    # ------------------------------------------------------------------ top level
    Case("no verb", lambda a: [], match="no verb"),
    Case("unknown verb", lambda a: ["bogus"], match="invalid choice"),
    Case("data without action", lambda a: ["data"], match="ACTION"),
    # ------------------------------------------------------------------ info
    Case("info: missing file", lambda a: ["info", str(a.scratch / "absent.pth")], match="absent.pth"),
    Case("info: no argument", lambda a: ["info"], match="checkpoint"),
    Case("info: a folder", lambda a: ["info", a.folder("ckpt_dir")], match="ckpt_dir.*folder"),
    Case("info: an ONNX graph", lambda a: ["info", a.file("seg.onnx", b"\x08\x08\x12\x07pytorch")],
         match="seg.onnx: an ONNX graph .*not a checkpoint"),
    Case("info: empty .pth", lambda a: ["info", a.file("empty.pth")], match="empty.pth"),
    Case("info: junk .pth", lambda a: ["info", a.file("junk.pth", b"not a checkpoint" * 10)], match="junk.pth"),
    Case("info: junk .safetensors", lambda a: ["info", a.file("junk.safetensors", b"\x00" * 64)],
         match="junk.safetensors"),
    Case("info: truncated safetensors", lambda a: ["info", _truncated(a)], match="truncated.safetensors"),
    Case("info: pickle that runs code", lambda a: ["info", a.torch_file("evil.pth", {"model": _RunsCode()})],
         match="evil.pth.*refused"),
    Case("info: no weights in file", lambda a: ["info", a.torch_file("epoch.pth", {"epoch": 3})],
         match="epoch.pth.*no state dict"),
    Case("info: metadata describes a huge ViT", lambda a: ["info", a.checkpoint("huge.safetensors",
         model={"embed_dim": 8192, "num_heads": 64, "depth": 24})], match="huge.safetensors.*holds only"),
    Case("info: metadata depth 100000", lambda a: ["info", a.checkpoint("deep.safetensors", model={"depth": 100000})],
         match="deep.safetensors.*depth"),
    Case("info: metadata not JSON", lambda a: ["info", a.checkpoint("badjson.safetensors", raw_metadata="{oops")],
         match="badjson.safetensors.*corrupt"),
    Case("info: metadata model is a list", lambda a: ["info", a.checkpoint("list.safetensors", model=[1, 2])],
         match="list.safetensors"),
    Case("info: heads do not divide width", lambda a: ["info", a.checkpoint("heads.safetensors",
         model={"num_heads": 5})], match="heads.safetensors.*divide"),
    Case("info: patch size 0", lambda a: ["info", a.checkpoint("patch0.safetensors", model={"patch_size": 0})],
         match="patch0.safetensors.*patch_size"),
    Case("info: negative image size", lambda a: ["info", a.checkpoint("img.safetensors", model={"img_size": -32})],
         match="img.safetensors.*img_size"),
    Case("info: depth as text", lambda a: ["info", a.checkpoint("text.safetensors", model={"depth": "2"})],
         match="text.safetensors.*depth"),
    Case("info: unknown architecture key", lambda a: ["info", a.checkpoint("key.safetensors", model={"wings": 2})],
         match="key.safetensors.*wings"),
    Case("info: key blocks.99999", lambda a: ["info", a.plain("keys.safetensors", _with(
         a.teacher_state(), blocks__99999__norm1__weight=torch.zeros(32)))], match="keys.safetensors.*blocks"),
    Case("info: key blocks.200 in a small file", lambda a: ["info", a.plain("keys200.safetensors", _with(
         a.teacher_state(), blocks__200__norm1__weight=torch.zeros(32)))], match="keys200.safetensors.*holds only"),
    Case("info: position table not square", lambda a: ["info", a.plain("pos.safetensors", _with(
         a.teacher_state(), pos_embed=torch.zeros(1, 7, 32)))], match="pos.safetensors.*square"),
    Case("info: position table of another width", lambda a: ["info", a.plain("posw.safetensors", _with(
         a.teacher_state(), pos_embed=torch.zeros(1, 5, 31)))], match="posw.safetensors.*pos_embed"),
    Case("info: patch embedding of 3 dimensions", lambda a: ["info", a.plain("pe.safetensors", _with(
         a.teacher_state(), patch_embed__proj__weight=torch.zeros(32, 3, 16)))], match="pe.safetensors"),
    Case("info: not a ViT", lambda a: ["info", a.plain("cnn.safetensors", {"conv1.weight": torch.zeros(8, 3, 3, 3)})],
         match="cnn.safetensors.*not a ViT"),
    Case("info: release args with a bad head count", lambda a: ["info", a.torch_file("release.pth", {
         "model": create_model("unip_vit_tiny_patch16", depth=12).state_dict(),
         "args": __import__("argparse").Namespace(model="unip_vit_tiny_patch16", last_heads=7)})],
         match="release.pth.*last_heads"),
    Case("info: timm model that does not exist", lambda a: ["info", "timm:no_such_model_xyz"],
         match="no_such_model_xyz"),
    Case("info: timm with a missing local file", lambda a: ["info", f"timm:vit_tiny_patch16_224@{a.scratch}/w.pth"],
         match="w.pth"),
    Case("info: timm with an empty file part", lambda a: ["info", "timm:vit_tiny_patch16_224@"],
         match="timm:NAME@FILE"),
    Case("info: timm offline", lambda a: ["info", "timm:vit_tiny_patch16_224"], setup=_offline_hub,
         match="offline.*timm:vit_tiny_patch16_224@"),
    # ------------------------------------------------------------------ analyze
    Case("analyze: images folder missing", lambda a: a.analyze(images=str(a.scratch / "nowhere")), match="nowhere"),
    Case("analyze: no images in folder", lambda a: a.analyze(images=a.folder("txt", {"a.txt": "x"})),
         match="no images found"),
    Case("analyze: every image broken", lambda a: a.analyze(images=a.folder("bad", {"a.png": IMAGE_PNG})),
         match="could be read"),
    Case("analyze: model missing", lambda a: ["analyze", "--model", str(a.scratch / "m.pth"), "--images", a.images,
                                             "--out", str(a.out)], match="m.pth"),
    Case("analyze: model with huge metadata", lambda a: ["analyze", "--model", a.checkpoint(
         "huge.safetensors", model={"embed_dim": 8192, "num_heads": 64}), "--images", a.images, "--out", str(a.out)],
         match="huge.safetensors"),
    Case("analyze: --size 100000", lambda a: a.analyze("--size", "100000"), match="--size.*lower --size"),
    Case("analyze: --size 0", lambda a: a.analyze("--size", "0"), match="--size"),
    Case("analyze: --images given twice", lambda a: a.analyze("--images", a.odd_images), match="--images: given twice"),
    Case("analyze: --size not a multiple of the patch", lambda a: a.analyze("--size", "33"), match="multiples"),
    Case("analyze: --size text", lambda a: a.analyze("--size", "big"), match="--size"),
    Case("analyze: --batch-size 0", lambda a: a.analyze("--batch-size", "0"), match="--batch-size"),
    Case("analyze: --batch-size -3", lambda a: a.analyze("--batch-size", "-3"), match="--batch-size"),
    Case("analyze: --batch-size text", lambda a: a.analyze("--batch-size", "many"), match="--batch-size"),
    Case("analyze: --num-images -1", lambda a: a.analyze("--num-images", "-1"), match="--num-images"),
    Case("analyze: --nmi-local 2", lambda a: a.analyze("--nmi-local", "2"), match="--nmi-local"),
    Case("analyze: global above local", lambda a: a.analyze("--nmi-global", "0.5", "--nmi-local", "0.3"),
         match="--nmi-global"),
    Case("analyze: --local-distance nan", lambda a: a.analyze("--local-distance", "nan"), match="--local-distance"),
    Case("analyze: query outside the image", lambda a: a.analyze("--query", "9999,9999"), match="9999"),
    Case("analyze: query text", lambda a: a.analyze("--query", "a,b"), match="--query"),
    Case("analyze: zero std", lambda a: a.analyze("--norm", "0.5,0"), match="--norm"),
    Case("analyze: unknown device", lambda a: a.analyze("--device", "toaster"), match="--device"),
    Case("analyze: a device kind unip does not run on", lambda a: a.analyze("--device", "mps"),
         match="--device mps: unip runs on a CPU or a CUDA GPU"),
    Case("pretrain: the meta device", lambda a: a.pretrain("--device", "meta"), match="--device meta: unip runs on"),
    Case("analyze: unknown precision", lambda a: a.analyze("--precision", "fp64"), match="--precision"),
    Case("analyze: --out is a file", lambda a: a.analyze(out=a.file("out.txt", "mine")), match="out.txt.*is a file"),
    Case("analyze: --out below a file", lambda a: a.analyze(out=a.file("f.txt", "mine") + "/sub"), match="f.txt"),
    Case("analyze: --out holds the user's profile.json",
         lambda a: a.analyze(out=a.out_with("mine", {"profile.json": '{"mine": 1}', **USER_FILES})),
         match="profile.json.*not written by unip"),
    Case("analyze: --out holds the user's nmi.png",
         lambda a: a.analyze(out=a.out_with("mine", {"nmi.png": IMAGE_PNG})), match="nmi.png"),
    Case("analyze: --out a user folder with other files", lambda a: a.analyze(out=a.out_with("mine", USER_FILES)),
         code=0),
    Case("analyze: odd file names", lambda a: a.analyze(images=a.odd_images, out=str(a.out / "odd")), code=0),
    # ------------------------------------------------------------------ pretrain
    Case("pretrain: --epochs -1", lambda a: a.pretrain("--epochs", "-1"), match="--epochs.*optim.epochs"),
    Case("pretrain: --epochs 0", lambda a: a.pretrain("--epochs", "0"), match="optim.epochs"),
    Case("pretrain: --batch-size 0", lambda a: a.pretrain("--batch-size", "0"), match="optim.batch_size"),
    Case("pretrain: --accum-iter -2", lambda a: a.pretrain("--accum-iter", "-2"), match="optim.accum_iter"),
    Case("pretrain: --blr -1", lambda a: a.pretrain("--blr", "-1"), match="optim.blr"),
    Case("pretrain: --blr nan", lambda a: a.pretrain("--blr", "nan"), match="optim.blr"),
    Case("pretrain: --blr 50", lambda a: a.pretrain("--blr", "50"), match="optim.blr"),
    Case("pretrain: --workers -1", lambda a: a.pretrain("--workers", "-1"), match="--workers"),
    Case("pretrain: --seed -5", lambda a: a.pretrain("--seed", "-5"), match="--seed"),
    Case("pretrain: clip_grad -1", lambda a: a.pretrain("--set", "optim.clip_grad=-1"), match="optim.clip_grad"),
    Case("pretrain: lr 0", lambda a: a.pretrain("--set", "optim.lr=0"), match="optim.lr"),
    Case("pretrain: epochs null", lambda a: a.pretrain("--set", "optim.epochs=null"), match="optim.epochs.*null"),
    Case("pretrain: epochs 2.5", lambda a: a.pretrain("--set", "optim.epochs=2.5"), match="optim.epochs"),
    Case("pretrain: beta of 1.5", lambda a: a.pretrain("--set", "optim.betas=[0.9, 1.5]"), match="optim.betas"),
    Case("pretrain: one beta", lambda a: a.pretrain("--set", "optim.betas=[0.9]"), match="optim.betas"),
    Case("pretrain: std 0", lambda a: a.pretrain("--set", "data.std=0"), match="data.std"),
    Case("pretrain: scale not increasing", lambda a: a.pretrain("--set", "data.scale=[0.9, 0.2]"),
         match="data.scale"),
    Case("pretrain: temperature 0", lambda a: a.pretrain("--set", "loss.temperature=0"), match="loss.temperature"),
    Case("pretrain: unknown loss", lambda a: a.pretrain("--set", "loss.kind=mse"), match="loss.kind"),
    Case("pretrain: drop path 1.5", lambda a: a.pretrain("--set", "student.drop_path=1.5"),
         match="student.drop_path"),
    Case("pretrain: student depth 100000", lambda a: a.pretrain("--set", "student.depth=100000"),
         match="student.depth"),
    Case("pretrain: keep no checkpoint", lambda a: a.pretrain("--set", "run.keep_checkpoints=0"),
         match="run.keep_checkpoints"),
    Case("pretrain: empty --set value", lambda a: a.pretrain("--set", "optim.blr="), match="no value"),
    Case("pretrain: unknown setting", lambda a: a.pretrain("--set", "optim.bogus=1"), match="optim.bogus"),
    Case("pretrain: unknown preset", lambda a: ["pretrain", "no-such-preset"], match="no-such-preset"),
    Case("pretrain: preset file not UTF-8", lambda a: ["pretrain", a.file("p.yaml", b"optim:\n  blr: \xff\xfe\n")],
         match="p.yaml"),
    Case("pretrain: preset file not a mapping", lambda a: ["pretrain", a.file("l.yaml", "- 1\n- 2\n")],
         match="l.yaml"),
    Case("pretrain: teacher layer text", lambda a: a.pretrain("--teacher-layer", "last"), match="--teacher-layer"),
    Case("pretrain: teacher layer 99", lambda a: a.pretrain("--teacher-layer", "99"),
         match="--teacher-layer 99 is out of range: the teacher .*teacher.safetensors has layers 1..2; pass "
               "--teacher-layer 1..2, or auto"),
    Case("pretrain: teacher with a huge architecture", lambda a: a.pretrain("--teacher", a.checkpoint(
         "huge.safetensors", model={"embed_dim": 8192, "num_heads": 64})), match="huge.safetensors"),
    Case("pretrain: data missing", lambda a: a.pretrain(data=str(a.scratch / "no_data")), match="no_data"),
    Case("pretrain: truncated pack", lambda a: a.pretrain(data=_damaged_pack(a, _truncate_shard)),
         match="shard-00000.bin.*truncated"),
    Case("pretrain: resume from a missing file", lambda a: a.pretrain("--resume", str(a.scratch / "s.pt")),
         match="s.pt"),
    Case("pretrain: --out is a file", lambda a: a.pretrain(out=a.file("run.txt", "mine")), match="run.txt.*is a file"),
    Case("pretrain: --out holds the user's config.yaml",
         lambda a: a.pretrain(out=a.out_with("mine", {"config.yaml": "my: settings\n", **USER_FILES})),
         match="config.yaml.*not written by unip"),
    Case("pretrain: --out not writable", lambda a: a.pretrain(out=str(a.out / "run")), setup=_read_only_out,
         match="--out .*run: cannot write in"),
    Case("analyze: --out not writable", lambda a: a.analyze(), setup=_read_only_out, match="cannot write in"),
    Case("pretrain: --out holds a fine-tuning run", lambda a: a.pretrain(out=a.out_with("ft", {
         "config.yaml": dump_config(SEG_DEFAULTS), "log.jsonl": ""})), match="ft: holds another kind of unip run"),
    Case("finetune: --out holds a pre-training run", lambda a: a.finetune(out=a.out_with("pt", {
         "config.yaml": dump_config(PRETRAIN_DEFAULTS)})), match="pt: holds another kind of unip run"),
    Case("pretrain: resume from a state without RNG entries", lambda a: a.pretrain(
         "--teacher-layer", "2", "--resume", a.damaged_state("rng.pt", rng={})),
         match=r"rng\.pt: damaged training state \(rng has no python, numpy, torch state\)"),
    Case("pretrain: resume from a state with a float torch RNG", lambda a: a.pretrain(
         "--teacher-layer", "2", "--resume", a.damaged_state("rngt.pt", rng_torch=torch.zeros(5))),
         match=r"rngt\.pt: damaged training state \(rng\.torch"),
    Case("pretrain: resume from a state whose step is text", lambda a: a.pretrain(
         "--teacher-layer", "2", "--resume", a.damaged_state("text.pt", step="8")), match=r"text\.pt.*step is '8'"),
    Case("pretrain: resume from a state at step -5", lambda a: a.pretrain(
         "--teacher-layer", "2", "--resume", a.damaged_state("neg.pt", step=-5)), match=r"neg\.pt.*step is -5"),
    Case("pretrain: resume from a state whose extra is a list", lambda a: a.pretrain(
         "--teacher-layer", "2", "--resume", a.damaged_state("extra.pt", extra=[1])),
         match=r"extra\.pt.*extra is a list, not a dict"),
    Case("pretrain: resume from a state without an optimiser", lambda a: a.pretrain(
         "--teacher-layer", "2", "--resume", a.damaged_state("opt.pt", optimizer=None)),
         match=r"opt\.pt.*optimizer is a NoneType, not a dict"),
    Case("pretrain: --out holds the user's log.jsonl",
         lambda a: a.pretrain(out=a.out_with("mine", {"log.jsonl": '{"my": "log"}\n', **USER_FILES})),
         match="log.jsonl.*not written by unip"),
    Case("pretrain: --out holds a file named checkpoints",
         lambda a: a.pretrain(out=a.out_with("mine", {"checkpoints": "mine", **USER_FILES})),
         match="checkpoints: is a file where unip keeps the run's checkpoints/ folder"),
    Case("pretrain: unknown precision", lambda a: a.pretrain("--precision", "fp64"), match="--precision"),
    Case("pretrain: bf16 teacher in an fp32 run", lambda a: a.pretrain("--teacher-precision", "bf16"),
         match="teacher-precision bf16 needs a mixed-precision run.*--precision bf16"),
    Case("pretrain: student.init of another depth", lambda a: a.pretrain("--set", f"student.init={a.teacher}"),
         match="student.init=.*teacher.safetensors: width 32, depth 2.*depth 1"),
    Case("pretrain: student.init missing", lambda a: a.pretrain("--set", f"student.init={a.scratch}/none.pt"),
         match=r"student\.init: .*none\.pt: no such checkpoint file.*--set student\.init=FILE"),
    # ------------------------------------------------------------------ finetune
    Case("finetune: no --pretrained", lambda a: ["finetune", "toy", "--data", a.labeled, "--out", str(a.out / "f")],
         match="no backbone.*--pretrained"),
    Case("finetune: no --data", lambda a: ["finetune", "toy", "--pretrained", a.teacher, "--out", str(a.out / "f")],
         match="no data.*--data"),
    Case("finetune: data missing", lambda a: a.finetune(data=str(a.scratch / "nowhere")), match="nowhere"),
    Case("finetune: not a segmentation set", lambda a: a.finetune(data=a.infrared), match="infrared"),
    Case("finetune: layout of another data set", lambda a: a.finetune("--dataset", "mfnet"),
         match="looks like a soda data set.*--dataset soda"),
    Case("finetune: a folder set (classes.yaml) with a scut preset's layout", lambda a: a.finetune(
         "--dataset", "scut", data=_folder_set(a)), match="looks like a folder data set.*--dataset folder"),
    Case("finetune: split file missing", lambda a: a.finetune(data=a.labeled_copy(
         lambda root: (root / "test_infrared.txt").unlink())), match="test_infrared.txt"),
    Case("finetune: unknown preset", lambda a: ["finetune", "no-such-preset"], match="no-such-preset"),
    Case("finetune: a pretrain preset", lambda a: ["finetune", "mae-l_unip-s"], match="finetune preset"),
    Case("finetune: --probe-layer 0", lambda a: a.finetune("--probe-layer", "0"), match="--probe-layer"),
    Case("finetune: --probe-layer past the backbone", lambda a: a.finetune("--probe-layer", "5"),
         match="probe_layer=5.*blocks 1..2"),
    Case("finetune: probe layer without a linear head", lambda a: a.finetune("--set", "model.probe_layer=1"),
         match="--probe linear"),
    Case("finetune: --probe mask", lambda a: a.finetune("--probe", "mask"), match="--probe"),
    Case("finetune: --iterations 0", lambda a: a.finetune("--iterations", "0"), match="--iterations"),
    Case("finetune: --batch-size -1", lambda a: a.finetune("--batch-size", "-1"), match="--batch-size"),
    Case("finetune: --workers -1", lambda a: a.finetune("--workers", "-1"), match="--workers"),
    Case("finetune: lr 0", lambda a: a.finetune("--set", "optim.lr=0"), match="optim.lr"),
    Case("finetune: lr null", lambda a: a.finetune("--set", "optim.lr=null"), match="optim.lr"),
    Case("finetune: layer decay 1.5", lambda a: a.finetune("--set", "model.layer_decay=1.5"),
         match="model.layer_decay"),
    Case("finetune: crop 8", lambda a: a.finetune("--set", "data.crop_size=8"), match="data.crop_size"),
    Case("finetune: crop not a multiple of the patch", lambda a: a.finetune("--set", "data.crop_size=40"),
         match="data.crop_size=40.*patch size 16"),
    Case("finetune: stride above the crop", lambda a: a.finetune("--set", "eval.stride=100"), match="eval.stride"),
    Case("finetune: ratio range decreasing", lambda a: a.finetune("--set", "data.ratio_range=[2.0, 0.5]"),
         match="data.ratio_range"),
    Case("finetune: unknown head", lambda a: a.finetune("--set", "model.head=mask2former"), match="model.head"),
    Case("finetune: last-block heads not dividing the width", lambda a: a.finetune(
         "--set", "model.last_block_heads=5"), match="last_block_heads=5.*divide"),
    Case("finetune: unknown backbone preset", lambda a: a.finetune("--set", "model.backbone=resnet50"),
         match="model.backbone"),
    Case("finetune: --pretrained missing file", lambda a: a.finetune(pretrained=str(a.scratch / "w.pth")),
         match="w.pth"),
    Case("finetune: --pretrained junk", lambda a: a.finetune(pretrained=a.file("junk.safetensors", b"\x00" * 64)),
         match="junk.safetensors"),
    Case("finetune: --pretrained pickle that runs code", lambda a: a.finetune(
         pretrained=a.torch_file("evil.pth", {"model": _RunsCode()})), match="evil.pth.*refused"),
    Case("finetune: bad label values (read in a worker)", lambda a: a.finetune(
         "--workers", "1", data=a.labeled_copy(_bad_label_values)), match=r"\.png.*30"),
    Case("finetune: --check-data lists every problem", lambda a: a.finetune(
         "--check-data", data=a.labeled_copy(_label_of_another_size)), match="1 data problem"),
    Case("finetune: resume from a missing file", lambda a: a.finetune("--resume", str(a.scratch / "s.pt")),
         match="s.pt"),
    Case("finetune: resume from a file that is not a training state", lambda a: a.finetune(
         "--resume", a.file("mkckpt.py", "print('hi')\n")), match=r"mkckpt.py: not a unip training state.*auto$"),
    Case("finetune: --probe linear with --set model.head=upernet", lambda a: a.finetune(
         "--probe", "linear", "--set", "model.head=upernet"), match="--probe.*model.head=upernet"),
    Case("finetune: an accum_iter that contradicts the effective batch", lambda a: a.finetune(
         "--set", "optim.effective_batch=4", "--set", "optim.accum_iter=3"), match="optim.accum_iter=3 contradicts"),
    Case("finetune: fewer training images than one step of the effective batch", lambda a: a.finetune(
         "--set", "optim.effective_batch=8"), match="4 samples.*optim.effective_batch to at most 4"),
    Case("finetune: --out holds the report of unip evaluate", lambda a: a.finetune(out=a.out_with("ev", {
         "metrics.json": json.dumps({"format": "unip-segmentation-metrics", "version": 1, "mIoU": 50.0})})),
         match="metrics.json: holds the report of unip evaluate"),
    Case("finetune: unknown precision", lambda a: a.finetune("--precision", "fp64"), match="--precision"),
    Case("finetune: --out holds a file named tb", lambda a: a.finetune(out=a.out_with("mine", {"tb": "mine"})),
         match="tb: is a file where unip keeps the run's tb/ folder"),
    Case("finetune: --out holds the user's log.jsonl",
         lambda a: a.finetune(out=a.out_with("mine", {"log.jsonl": "not json\n"})),
         match="log.jsonl.*not written by unip"),
    Case("finetune: --out is a file", lambda a: a.finetune(out=a.file("run.txt", "mine")), match="run.txt.*is a file"),
    Case("finetune: --out holds the user's metrics.json",
         lambda a: a.finetune(out=a.out_with("mine", {"metrics.json": '{"mine": 1}', **USER_FILES})),
         match="metrics.json.*not written by unip"),
    Case("finetune: --out holds the user's segmentor.safetensors",
         lambda a: a.finetune(out=a.out_with("mine", {"segmentor.safetensors": b"weights"})),
         match="segmentor.safetensors.*not written by unip"),
    Case("finetune: --out a user folder with other files", lambda a: a.finetune(out=a.out_with("mine", USER_FILES)),
         code=0),
    # ------------------------------------------------------------------ evaluate
    Case("evaluate: no --checkpoint", lambda a: ["evaluate", "--data", a.labeled], match="--checkpoint"),
    Case("evaluate: missing checkpoint", lambda a: a.evaluate(checkpoint=str(a.scratch / "seg.pth")),
         match="seg.pth"),
    Case("evaluate: a backbone, not a segmentor", lambda a: a.evaluate(checkpoint=a.teacher),
         match="teacher.safetensors.*not a segmentor"),
    Case("evaluate: 9-class release checkpoint on SODA", lambda a: a.evaluate(checkpoint=a.release_mfnet),
         match="release_mfnet.pth.*9 classes.*21"),
    Case("evaluate: release checkpoint missing a key", lambda a: a.evaluate(checkpoint=a.torch_file("r.pth", {
         "meta": {}, "state_dict": _with(release_state_dict(32, 2, 9, grid=2, channels=16, aux_channels=8),
                                         decode_head__bottleneck__conv__weight=None)})), match="r.pth"),
    Case("evaluate: junk .pth", lambda a: a.evaluate(checkpoint=a.file("junk.pth", b"not a checkpoint" * 10)),
         match="junk.pth"),
    Case("evaluate: pickle that runs code", lambda a: a.evaluate(checkpoint=a.torch_file(
         "evil.pth", {"state_dict": _RunsCode()})), match="evil.pth.*refused"),
    Case("evaluate: data missing", lambda a: a.evaluate(data=str(a.scratch / "nowhere")), match="nowhere"),
    Case("evaluate: --split bogus", lambda a: a.evaluate("--split", "bogus"), match="--split"),
    Case("evaluate: --scales 0", lambda a: a.evaluate("--scales", "0"), match="--scales"),
    Case("evaluate: --scales text", lambda a: a.evaluate("--scales", "big,small"), match="--scales"),
    Case("evaluate: --batch-size 0", lambda a: a.evaluate("--batch-size", "0"), match="--batch-size"),
    Case("evaluate: --overlays -1", lambda a: a.evaluate("--overlays", "-1"), match="--overlays"),
    Case("evaluate: unknown device", lambda a: a.evaluate("--device", "toaster"), match="toaster"),
    Case("evaluate: bad label values", lambda a: a.evaluate(data=a.labeled_copy(_bad_label_values)),
         match=r"\.png.*30"),
    Case("evaluate: bad label values (read in a worker)", lambda a: a.evaluate(
         "--workers", "1", data=a.labeled_copy(_bad_label_values)), match=r"\.png.*30"),
    Case("evaluate: --check-data lists every problem", lambda a: a.evaluate(
         "--check-data", data=a.labeled_copy(_label_of_another_size)), match="1 data problem"),
    Case("evaluate: --out is a file", lambda a: a.evaluate(out=a.file("e.txt", "mine")), match="e.txt.*is a file"),
    Case("evaluate: --out holds the user's metrics.json",
         lambda a: a.evaluate(out=a.out_with("mine", {"metrics.json": '{"mine": 1}'})),
         match="metrics.json.*not written by unip"),
    Case("evaluate: --out a fine-tuning run's folder (its metrics.json)", lambda a: a.evaluate(out=a.out_with("run", {
         "metrics.json": json.dumps({"format": "unip-segmentation-metrics", "version": 1, "mIoU": 50.0,
                                     "best": None})})), match="metrics.json: holds the test metrics of a unip"),
    Case("evaluate: --out a training run's folder (its log)", lambda a: a.evaluate(out=a.out_with("run", {
         "log.jsonl": '{"event": "setup", "time": 0}\n'})), match="training run's folder.*log.jsonl"),
    Case("evaluate: --out holds the user's confusion.png",
         lambda a: a.evaluate(out=a.out_with("mine", {"confusion.png": IMAGE_PNG})), match="confusion.png"),
    Case("evaluate: the user's file in overlays/",
         lambda a: a.evaluate(out=a.out_with("mine", {"overlays/holiday.jpg": b"\xff\xd8"})), match="holiday.jpg"),
    Case("evaluate: --out a user folder with other files", lambda a: a.evaluate(out=a.out_with("mine", USER_FILES)),
         code=0),
    # ------------------------------------------------------------------ data infmix
    Case("infmix: no source", lambda a: ["data", "infmix", "--out", str(a.out / "m.jsonl")], match="no source"),
    Case("infmix: missing root", lambda a: ["data", "infmix", "--infrared", str(a.scratch / "ir"),
                                           "--out", str(a.out / "m.jsonl")], match="ir"),
    Case("infmix: root without thermal folders", lambda a: ["data", "infmix", "--infrared", a.folder("ir", {
         "x/a.png": IMAGE_PNG}), "--out", str(a.out / "m.jsonl")], match="thermal"),
    Case("infmix: no images found", lambda a: ["data", "infmix", "--extra", a.folder("txt", {"a.txt": "x",
         "b.png": IMAGE_PNG}), "--out", str(a.out / "m.jsonl")], match="no readable images"),
    Case("infmix: --per-class 0", lambda a: ["data", "infmix", "--imagenet", a.infrared, "--per-class", "0",
                                            "--out", str(a.out / "m.jsonl")], match="--per-class"),
    Case("infmix: --infrared given twice", lambda a: ["data", "infmix", "--infrared", a.infrared, "--infrared",
         str(a.root / "odd"), "--out", str(a.out / "m.jsonl")], match="--infrared: given twice"),
    Case("infmix: --coco given twice", lambda a: ["data", "infmix", "--coco", a.images, "--coco", a.odd_images,
                                                 "--out", str(a.out / "m.jsonl")], match="--coco: given twice"),
    Case("infmix: --workers 0", lambda a: ["data", "infmix", "--infrared", a.infrared, "--workers", "0",
                                          "--out", str(a.out / "m.jsonl")], match="--workers"),
    Case("infmix: --out is a folder", lambda a: ["data", "infmix", "--infrared", a.infrared, "--out", str(a.out)],
         match="is a folder"),
    Case("infmix: --out is the user's file", lambda a: ["data", "infmix", "--infrared", a.infrared, "--out",
         a.out_with("mine", {"notes.jsonl": "my notes\n"}) + "/notes.jsonl"], match="not written by unip"),
    Case("infmix: --out below a file", lambda a: ["data", "infmix", "--infrared", a.infrared, "--out",
         a.file("f.txt", "x") + "/m.jsonl"], match="f.txt"),
    Case("infmix: odd file names", lambda a: ["data", "infmix", "--extra", a.odd_images, "--out",
                                             str(a.out / "m.jsonl")], code=0),
    Case("infmix: --coco root without train2017", lambda a: ["data", "infmix", "--coco", a.folder("coco", {
         "val2017/x.png": IMAGE_PNG, "annotations/a.json": "{}"}), "--out", str(a.out / "m.jsonl")],
         match="without train2017.*point --coco at the train2017 folder"),
    Case("infmix: --imagenet root, not its train folder", lambda a: ["data", "infmix", "--imagenet", a.folder(
         "imnet", {"train/n01/x.png": IMAGE_PNG, "val/x.png": IMAGE_PNG}), "--out", str(a.out / "m.jsonl")],
         match="ImageNet root.*imnet/train"),
    Case("infmix: --infrared one data set's folder", lambda a: ["data", "infmix", "--infrared",
         os.path.dirname(a.images), "--out", str(a.out / "m.jsonl")], match="one data set's folder"),
    # ------------------------------------------------------------------ data stats
    Case("stats: --out not writable", lambda a: ["data", "stats", a.manifest, "--out", str(a.out / "st")],
         setup=_read_only_out, match="--out .*st.json: cannot write in .*read-only or no permission"),
    Case("pack: --out not writable", lambda a: ["data", "pack", a.manifest, "--out", str(a.out / "p")],
         setup=_read_only_out, match="cannot write in"),
    Case("infmix: --out not writable", lambda a: ["data", "infmix", "--infrared", a.infrared, "--out",
                                                 str(a.out / "m.jsonl")],
         setup=_read_only_out, match="cannot write in"),
    Case("stats: missing manifest", lambda a: ["data", "stats", str(a.scratch / "m.jsonl"), "--out",
                                              str(a.out / "s")], match="m.jsonl"),
    Case("stats: manifest not UTF-8", lambda a: ["data", "stats", a.file("m.jsonl", b'{"path": "\xff\xfe"}\n'),
                                                "--out", str(a.out / "s")], match="m.jsonl:1.*UTF-8"),
    Case("stats: manifest not JSON", lambda a: ["data", "stats", a.file("m.jsonl", "{oops\n"), "--out",
                                               str(a.out / "s")], match="m.jsonl:1"),
    Case("stats: manifest of lists", lambda a: ["data", "stats", a.file("m.jsonl", "[1, 2]\n"), "--out",
                                               str(a.out / "s")], match="m.jsonl:1"),
    Case("stats: record without path", lambda a: ["data", "stats", a.file("m.jsonl", '{"source": "x"}\n'),
                                                 "--out", str(a.out / "s")], match="m.jsonl:1.*path"),
    Case("stats: empty manifest", lambda a: ["data", "stats", a.file("m.jsonl", ""), "--out", str(a.out / "s")],
         match="no images"),
    Case("stats: only missing files", lambda a: ["data", "stats", a.file("m.jsonl", json.dumps(
         {"path": str(a.scratch / "gone.png"), "source": "x"}) + "\n"), "--out", str(a.out / "s")],
         match="could be read"),
    Case("stats: --limit 0", lambda a: ["data", "stats", a.manifest, "--limit", "0", "--out", str(a.out / "s")],
         match="--limit"),
    Case("stats: --seed -1", lambda a: ["data", "stats", a.manifest, "--seed", "-1", "--out", str(a.out / "s")],
         match="--seed"),
    Case("stats: --workers -2", lambda a: ["data", "stats", a.manifest, "--workers", "-2", "--out",
                                          str(a.out / "s")], match="--workers"),
    Case("stats: truncated shard", lambda a: ["data", "stats", _damaged_pack(a, _truncate_shard), "--out",
                                             str(a.out / "s")], match="shard-00000.bin.*truncated"),
    Case("stats: index.json not JSON", lambda a: ["data", "stats", _damaged_pack(
         a, lambda p: (p / "index.json").write_text("{oops")), "--out", str(a.out / "s")], match="index.json"),
    Case("stats: index.npy garbage", lambda a: ["data", "stats", _damaged_pack(
         a, lambda p: (p / "index.npy").write_bytes(b"garbage")), "--out", str(a.out / "s")], match="index.npy"),
    Case("stats: index.npy of another count", lambda a: ["data", "stats", _damaged_pack(
         a, lambda p: np.save(p / "index.npy", np.zeros((2, 5), np.int64))), "--out", str(a.out / "s")],
         match="index.npy"),
    Case("stats: index pointing past the shards", lambda a: ["data", "stats", _damaged_pack(
         a, lambda p: np.save(p / "index.npy", np.full((4, 5), 7, np.int64))), "--out", str(a.out / "s")],
         match="index.npy"),
    Case("stats: folder without index", lambda a: ["data", "stats", a.folder("nopack", {"a.txt": "x"}), "--out",
                                                  str(a.out / "s")], match="index.json"),
    Case("stats: --out holds the user's JSON", lambda a: ["data", "stats", a.manifest, "--out",
         a.out_with("mine", {"s.json": '{"mine": 1}'}) + "/s"], match="s.json.*not written by unip"),
    Case("stats: odd file names", lambda a: ["data", "stats", a.odd_manifest, "--out", str(a.out / "s")], code=0),
    # ------------------------------------------------------------------ data pack
    Case("pack: missing manifest", lambda a: ["data", "pack", str(a.scratch / "m.jsonl"), "--out",
                                             str(a.out / "p")], match="m.jsonl"),
    Case("pack: --out a user folder with an index.json",
         lambda a: ["data", "pack", a.manifest, "--out", a.out_with("mine", {"index.json": "{}", **USER_FILES})],
         match="not a pack"),
    Case("pack: --out a pack folder with the user's notes added",
         lambda a: ["data", "pack", a.manifest, "--out", _damaged_pack(a, lambda p: (p / "notes.txt").write_text("x"))],
         match="notes.txt"),
    Case("pack: --out is a file", lambda a: ["data", "pack", a.manifest, "--out", a.file("p.bin", "x")],
         match="p.bin.*is a file"),
    Case("pack: --short-side 0", lambda a: ["data", "pack", a.manifest, "--short-side", "0", "--out",
                                           str(a.out / "p")], match="--short-side"),
    Case("pack: --shard-mb -1", lambda a: ["data", "pack", a.manifest, "--shard-mb", "-1", "--out",
                                          str(a.out / "p")], match="--shard-mb"),
    Case("pack: empty manifest", lambda a: ["data", "pack", a.file("m.jsonl", ""), "--out", str(a.out / "p")],
         match="no images"),
    Case("pack: only unreadable files", lambda a: ["data", "pack", a.file("m.jsonl", json.dumps(
         {"path": a.file("x.png", IMAGE_PNG), "source": "x"}) + "\n"), "--out", str(a.out / "p")],
         match="could be read"),
    Case("pack: manifest not UTF-8", lambda a: ["data", "pack", a.file("m.jsonl", b"\xff\n"), "--out",
                                               str(a.out / "p")], match="m.jsonl:1"),
    Case("pack: odd file names", lambda a: ["data", "pack", a.odd_manifest, "--out", str(a.out / "p")], code=0),
    Case("pack: a pack folder as the manifest", lambda a: ["data", "pack", a.pack, "--out", str(a.out / "p")],
         match="is a pack folder.*manifest.jsonl"),
    Case("pack: a pack's index.json as the manifest", lambda a: ["data", "pack", os.path.join(a.pack, "index.json"),
                                                                 "--out", str(a.out / "p")], match="pack's index"),
    # ------------------------------------------------------------------ data synth
    Case("synth: --name ../../x", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--num", "1", "--name",
                                            "../../x"], match="--name"),
    Case("synth: --name a/b", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--num", "1", "--name", "a/b"],
         match="--name"),
    Case("synth: empty --name", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--num", "1", "--name", ""],
         match="--name"),
    Case("synth: second --name bad", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--num", "1",
                                               "--name", "ok", "--name", ".."], match="--name"),
    Case("synth: --size 100000x100000", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--size",
                                                  "100000x100000"], match="--size"),
    Case("synth: --size 10x10", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--size", "10x10"],
         match="10x10"),
    Case("synth: --size text", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--size", "big"], match="big"),
    Case("synth: --num 0", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--num", "0"], match="--num"),
    Case("synth: --num -5", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--num", "-5"], match="--num"),
    Case("synth: --num-test above --num", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--labeled",
                                                    "--num", "4", "--num-test", "10"], match="--num"),
    Case("synth: --seed -1", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--seed", "-1"], match="--seed"),
    Case("synth: --bit-depth 12", lambda a: ["data", "synth", "--out", str(a.out / "s"), "--bit-depth", "12"],
         match="--bit-depth"),
    Case("synth: --out is a file", lambda a: ["data", "synth", "--out", a.file("s.txt", "x"), "--num", "1"],
         match="s.txt.*is a file"),
    Case("synth: into the user's thermal folder", lambda a: ["data", "synth", "--num", "1", "--name", "real",
         "--out", a.out_with("mine", {"real/thermal/frame_0001.png": IMAGE_PNG})], match="frame_0001.png"),
    Case("synth: labeled into the user's SODA folder", lambda a: ["data", "synth", "--labeled", "--num", "2",
         "--out", a.out_with("soda", {"train_infrared.txt": "IMG_0001\n"})], match="train_infrared.txt"),
    Case("synth: labeled into a real SODA set named like its output", lambda a: ["data", "synth", "--labeled",
         "--num", "2", "--out", a.out_with("soda", {"JPEGImages/00000.jpg": IMAGE_PNG,
                                                    "train_infrared.txt": "00000\n"})], match="00000.jpg"),
    Case("synth: --labeled --bit-depth 16", lambda a: ["data", "synth", "--labeled", "--bit-depth", "16", "--out",
                                                      str(a.out / "s")], match="--bit-depth"),
    # ------------------------------------------------------------------ data prepare / check-seg
    Case("prepare: unknown data set", lambda a: ["data", "prepare", "cityscapes", a.folder("raw"), str(a.out / "p")],
         match="cityscapes"),
    Case("prepare: RAW missing", lambda a: ["data", "prepare", "mfnet", str(a.scratch / "nope"), str(a.out / "p")],
         match="nope"),
    Case("prepare: RAW without images", lambda a: ["data", "prepare", "mfnet", a.folder("raw", {"x.txt": "x"}),
                                                   str(a.out / "p")], match="raw"),
    Case("prepare: scut RAW without images", lambda a: ["data", "prepare", "scut", a.folder("raw"),
                                                       str(a.out / "p")], match="raw"),
    Case("prepare: scut split file not UTF-8", lambda a: ["data", "prepare", "scut", a.folder("raw", {
         "scut_train.txt": b"images/\xff\xfe.jpg\n", "scut_val.txt": b"\xff\n"}), str(a.out / "p")],
         match="scut_(train|val).txt.*UTF-8"),
    Case("prepare: OUT is a file", lambda a: ["data", "prepare", "mfnet", a.folder("raw", MFNET_RAW),
                                              a.file("o.txt", "x")], match="o.txt"),
    Case("prepare: OUT is the user's folder", lambda a: ["data", "prepare", "mfnet", a.folder("raw", MFNET_RAW),
                                                        a.out_with("mine", USER_FILES)], match="mine"),
    Case("prepare: --workers 0", lambda a: ["data", "prepare", "mfnet", a.folder("raw"), str(a.out / "p"),
                                            "--workers", "0"], match="--workers"),
    Case("check-seg: ROOT missing", lambda a: ["data", "check-seg", str(a.scratch / "nope")], match="nope"),
    Case("check-seg: not a data set", lambda a: ["data", "check-seg", a.folder("plain", USER_FILES)],
         match="plain"),
    Case("check-seg: unknown layout", lambda a: ["data", "check-seg", a.folder("s"), "--dataset", "voc"],
         match="voc"),
    Case("check-seg: SODA without split files", lambda a: ["data", "check-seg", a.folder(
         "soda", {"JPEGImages/a.jpg": IMAGE_PNG, "SegmentationClassPNG/a.png": IMAGE_PNG}), "--dataset", "soda"],
         match="soda"),
    Case("check-seg: broken image and label", lambda a: ["data", "check-seg", a.folder(
         "soda", {"JPEGImages/a.jpg": IMAGE_PNG, "SegmentationClassPNG/a.png": IMAGE_PNG,
                  "train_infrared.txt": "a\n", "test_infrared.txt": "a\n"}), "--dataset", "soda"],
         match=r"problem\(s\)"),
    Case("check-seg: --workers 0", lambda a: ["data", "check-seg", a.folder("s"), "--workers", "0"],
         match="--workers"),
    # ------------------------------------------------------------------ sweep
    Case("sweep: no action", lambda a: ["sweep"], match="ACTION"),
    Case("sweep run: no --out", lambda a: ["sweep", "run", "tiny"], match="--out"),
    Case("sweep run: file missing", lambda a: a.sweep(sweep=str(a.scratch / "none.yaml")), match="none.yaml"),
    Case("sweep run: unknown shipped sweep", lambda a: a.sweep(sweep="no-such-sweep"),
         match="no-such-sweep.*paper, tiny"),
    Case("sweep run: not YAML", lambda a: a.sweep(sweep=a.file("bad.yaml", "{oops")), match="bad.yaml.*YAML"),
    Case("sweep run: not UTF-8", lambda a: a.sweep(sweep=a.file("u.yaml", b"name: \xff\xfe\n")), match="u.yaml"),
    Case("sweep run: a list, not a mapping", lambda a: a.sweep(sweep=a.file("l.yaml", "- 1\n")),
         match="l.yaml.*mapping"),
    Case("sweep run: unknown key", lambda a: a.sweep(sweep=a.sweep_file(colour="red")), match="unknown key 'colour'"),
    Case("sweep run: no backbones", lambda a: a.sweep(sweep=a.sweep_file(backbones=[])),
         match="backbones.*non-empty list"),
    Case("sweep run: backbone without source", lambda a: a.sweep(sweep=a.sweep_file(
         backbones=[{"name": "A", "size": "tiny"}])), match=r"backbones\[0\]: source"),
    Case("sweep run: backbone of size huge", lambda a: a.sweep(sweep=a.sweep_file(
         backbones=[{"name": "A", "size": "huge", "source": "none"}])), match="size 'huge' must be one of"),
    Case("sweep run: two backbones, one folder", lambda a: a.sweep(sweep=a.sweep_file(backbones=[
         {"name": "A b", "size": "tiny", "source": "none"}, {"name": "a-B", "size": "tiny", "source": "none"}])),
         match="two backbones named 'A b' and 'a-B'"),
    Case("sweep run: a name without letters", lambda a: a.sweep(sweep=a.sweep_file(
         backbones=[{"name": "***", "size": "tiny", "source": "none"}])), match="needs a letter or digit"),
    Case("sweep run: layout voc", lambda a: a.sweep(sweep=a.sweep_file(
         datasets=[{"name": "D", "root": a.labeled, "layout": "voc"}])), match="layout 'voc'"),
    Case("sweep run: unknown protocol", lambda a: a.sweep(sweep=a.sweep_file(protocols={"zeroshot": {}})),
         match="unknown protocol"),
    Case("sweep run: block 0", lambda a: a.sweep(sweep=a.sweep_file(protocols={"layerwise": {"layers": [0]}},
                                                                      analysis={"images": a.images})),
         match="layers must be 'all' or a list"),
    Case("sweep run: block 13 of a 12-block backbone", lambda a: a.sweep(sweep=a.sweep_file(
         protocols={"layerwise": {"layers": [4, 13]}}, analysis={"images": a.images})),
         match=r"block 13 of backbone 'A', whose architecture \(unip_vit_tiny_patch16\) has blocks 1..12"),
    Case("sweep run: layer-wise without analysis", lambda a: a.sweep(sweep=a.sweep_file(
         protocols={"layerwise": {"layers": [2]}})), match="needs an 'analysis:'"),
    Case("sweep run: protocol names an unknown backbone", lambda a: a.sweep(sweep=a.sweep_file(
         protocols={"ft": {"backbones": ["Z"]}})), match="'Z', which is not in"),
    Case("sweep run: seeds of text", lambda a: a.sweep(sweep=a.sweep_file(seeds=["a"])), match="seeds"),
    Case("sweep run: unknown preset", lambda a: a.sweep(sweep=a.sweep_file(preset="nope")),
         match="s.yaml: cell a/d/ft-seed0: unknown finetune preset 'nope'"),
    Case("sweep run: preset template with {model}", lambda a: a.sweep(sweep=a.sweep_file(preset="{model}")),
         match="only {dataset} and {size}"),
    Case("sweep run: unknown setting", lambda a: a.sweep(sweep=a.sweep_file(set={"optim.bogus": 1})),
         match="optim.bogus"),
    Case("sweep run: lr out of range", lambda a: a.sweep(sweep=a.sweep_file(set={"optim.lr": -1})),
         match="optim.lr must be"),
    Case("sweep run: variable without value", lambda a: a.sweep(sweep=a.sweep_file(
         vars={"root": None}, datasets=[{"name": "D", "root": "${root}", "layout": "soda"}])),
         match="has no value; pass --var root=VALUE"),
    Case("sweep run: variable not declared", lambda a: a.sweep(sweep=a.sweep_file(
         datasets=[{"name": "D", "root": "${nope}", "layout": "soda"}])), match="nope.*not declared"),
    Case("sweep run: --var of an unknown variable", lambda a: a.sweep("--var", "x=1"), match="--var x.*no such"),
    Case("sweep run: --var without =", lambda a: a.sweep("--var", "x"), match="NAME=VALUE"),
    Case("sweep run: --gpus 0", lambda a: a.sweep("--gpus", "0"), match="--gpus"),
    Case("sweep run: --gpus and --devices", lambda a: a.sweep("--gpus", "1", "--devices", "cpu"),
         match="give one of them"),
    Case("sweep run: --devices gpu0", lambda a: a.sweep("--devices", "gpu0"), match="--devices.*gpu0"),
    Case("sweep run: --only matching no job", lambda a: a.sweep("--only", "*/soda/*"),
         match="--only '\\*/soda/\\*' matches none of the 1 jobs"),
    Case("sweep run: --out is a file", lambda a: a.sweep(out=a.file("s.txt", "mine")), match="s.txt.*is a file"),
    Case("sweep run: --out below a file", lambda a: a.sweep(out=a.file("f.txt", "mine") + "/sub"), match="f.txt"),
    Case("sweep run: --out is the user's folder", lambda a: a.sweep(out=a.out_with("mine", USER_FILES)),
         match="mine: holds files that are not a sweep's"),
    Case("sweep run: --out holds the user's sweep.json", lambda a: a.sweep(out=a.out_with(
         "mine", {"sweep.json": '{"mine": 1}', **USER_FILES})), match="sweep.json.*not written by unip sweep"),
    Case("sweep run: data set folder missing", lambda a: a.sweep(sweep=a.sweep_file(
         datasets=[{"name": "D", "root": str(a.scratch / "nodata"), "layout": "soda"}])),
         match="data set 'D' \\(layout soda\\): .*nodata: data set folder not found; fix its root"),
    Case("sweep run: data set root is the user's folder", lambda a: a.sweep(sweep=a.sweep_file(
         datasets=[{"name": "D", "root": a.folder("mine", USER_FILES), "layout": "auto", "preset": "soda"}])),
         match="data set 'D' \\(layout auto\\): .*mine: not a known segmentation layout"),
    Case("sweep run: dry run, data set folder missing", lambda a: a.sweep("--dry-run", sweep=a.sweep_file(
         datasets=[{"name": "D", "root": str(a.scratch / "nodata"), "layout": "soda"}])),
         match="nodata: data set folder not found"),
    Case("sweep run: a CUDA device that is not there", lambda a: a.sweep("--devices", "cuda:4095"),
         match="--devices cuda:4095: (CUDA is not available|there is no cuda:4095)"),
    Case("sweep run: dry run", lambda a: a.sweep("--dry-run"), code=0),
    Case("sweep report: no folder", lambda a: ["sweep", "report", str(a.scratch / "nowhere")],
         match="nowhere: no such sweep folder"),
    Case("sweep report: a user folder", lambda a: ["sweep", "report", a.folder("mine", USER_FILES)],
         match="not a sweep folder"),
    Case("sweep report: damaged sweep.json", lambda a: ["sweep", "report", a.folder("sw", {"sweep.json": "{"})],
         match="sweep.json: not a readable sweep state"),
    Case("sweep report: --out is a file", lambda a: ["sweep", "report", a.sweep_folder(), "--out",
                                                     a.file("r.txt", "x")], match="r.txt.*is a file"),
    Case("sweep report: --out holds the user's table.csv", lambda a: ["sweep", "report", a.sweep_folder(), "--out",
         a.out_with("mine", {"table.csv": "a,b\n1,2\n", **USER_FILES})], match="table.csv.*not written by unip"),
    Case("sweep report: --out holds the user's report.html", lambda a: ["sweep", "report", a.sweep_folder(),
         "--out", a.out_with("mine", {"report.html": "<html></html>"})], match="report.html.*not written by unip"),
    Case("sweep report: nothing finished", lambda a: ["sweep", "report", a.sweep_folder(), "--out",
                                                      str(a.out / "report")], code=0),
    # ------------------------------------------------------------------ demo
    Case("demo: --out is a file", lambda a: ["demo", "--out", a.file("demo.txt", "x")], match="demo.txt.*is a file"),
    Case("demo: --out below a file", lambda a: ["demo", "--out", a.file("d.txt", "x") + "/sub"], match="d.txt"),
    Case("demo: --out holds the user's student_random.safetensors", lambda a: ["demo", "--fast", "--out", a.out_with(
         "mine", {"student_random.safetensors": b"my weights"})], match="student_random.safetensors.*not written"),
    Case("demo: --out holds the user's summary.md", lambda a: ["demo", "--out", a.out_with(
         "mine", {"summary.md": "# my notes\n"})], match="summary.md.*not written by unip"),
    Case("demo: --out holds the user's summary.png", lambda a: ["demo", "--out", a.out_with(
         "mine", {"summary.png": IMAGE_PNG})], match="summary.png.*not written by unip"),
    Case("demo: summary.json is a folder", lambda a: ["demo", "--out", a.out_with(
         "mine", {"summary.json/x": "x"})], match="summary.json.*is a folder"),
    Case("demo: UNIP_CACHE is a file", lambda a: ["demo", "--fast", "--out", str(a.out / "demo")],
         setup=lambda a: a.monkeypatch.setenv("UNIP_CACHE", a.file("cache.txt", "x")), match="UNIP_CACHE.*is a file"),
    Case("demo: XDG_CACHE_HOME below a file", lambda a: ["demo", "--fast", "--out", str(a.out / "demo")],
         setup=lambda a: (a.monkeypatch.delenv("UNIP_CACHE", raising=False),
                          a.monkeypatch.setenv("XDG_CACHE_HOME", a.file("xdg.txt", "x") + "/sub")),
         match="xdg.txt"),
    Case("demo: --seed -1", lambda a: ["demo", "--seed", "-1"], match="--seed"),
    Case("demo: an unknown option", lambda a: ["demo", "--epochs", "3"], match="unrecognized arguments"),
    # ------------------------------------------------------------------ predict
    Case("predict: no input", lambda a: ["predict", "--checkpoint", a.tiny_segmentor], match="INPUT"),
    Case("predict: checkpoint missing", lambda a: a.predict(checkpoint=str(a.scratch / "absent.safetensors")),
         match="absent.safetensors"),
    Case("predict: checkpoint is a backbone", lambda a: a.predict(checkpoint=a.teacher),
         match="teacher.safetensors.*not a segmentor"),
    Case("predict: checkpoint is junk", lambda a: a.predict(checkpoint=a.file("junk.pth", b"junk" * 10)),
         match="junk.pth"),
    Case("predict: checkpoint is an image", lambda a: a.predict(checkpoint=a.images + "/img1.png"), match="img1.png"),
    Case("predict: input missing", lambda a: a.predict(inputs=[str(a.scratch / "nowhere.png")]),
         match="nowhere.png: no such file"),
    Case("predict: input of another type", lambda a: a.predict(inputs=[a.file("notes.txt", "x")]),
         match="notes.txt: not an image"),
    Case("predict: folder without images", lambda a: a.predict(inputs=[a.folder("txt", {"a.txt": "x"})]),
         match="no images"),
    Case("predict: unreadable video", lambda a: a.predict(inputs=[a.file("clip.mp4", b"\x00\x00\x00 ftyp" * 20)]),
         match="clip.mp4: OpenCV cannot read"),
    Case("predict: empty video", lambda a: a.predict(inputs=[a.file("empty.avi")]), match="empty.avi"),
    Case("predict: --every 0", lambda a: a.predict("--every", "0"), match="--every"),
    Case("predict: --every -3", lambda a: a.predict("--every", "-3"), match="--every"),
    Case("predict: --every text", lambda a: a.predict("--every", "often"), match="--every"),
    Case("predict: --batch-size 0", lambda a: a.predict("--batch-size", "0"), match="--batch-size"),
    Case("predict: --batch-size 100000", lambda a: a.predict("--batch-size", "100000"), match="--batch-size"),
    Case("predict: --format gif", lambda a: a.predict("--format", "label,gif"), match="--format"),
    Case("predict: --format empty", lambda a: a.predict("--format", ","), match="--format"),
    Case("predict: --alpha 2", lambda a: a.predict("--alpha", "2"), match="--alpha"),
    Case("predict: --dataset of another class count", lambda a: a.predict("--dataset", "soda"),
         match="--dataset soda: 21 classes"),
    Case("predict: unknown --dataset", lambda a: a.predict("--dataset", "coco"), match="--dataset"),
    Case("predict: unknown device", lambda a: a.predict("--device", "toaster"), match="--device"),
    Case("predict: --workers 0", lambda a: a.predict("--workers", "0"), match="--workers"),
    Case("predict: --out is a file", lambda a: a.predict(out=a.file("pred.txt", "mine")), match="pred.txt.*is a file"),
    Case("predict: --out below a file", lambda a: a.predict(out=a.file("p.txt", "mine") + "/sub"), match="p.txt"),
    Case("predict: --out holds the user's label PNG", lambda a: a.predict(out=a.out_with(
         "mine", {"label/img0.png": IMAGE_PNG, **USER_FILES})), match="img0.png.*not written by unip"),
    Case("predict: --out holds the user's areas.csv", lambda a: a.predict(out=a.out_with(
         "mine", {"areas.csv": "my,table\n"})), match="areas.csv.*not written by unip"),
    Case("predict: --out holds a file where a folder goes", lambda a: a.predict(out=a.out_with(
         "mine", {"overlay": "a file"})), match="overlay.*is a file"),
    Case("predict: --out a user folder with other files", lambda a: a.predict(out=a.out_with("mine", USER_FILES)),
         code=0),
    Case("predict: odd file names", lambda a: a.predict(inputs=[a.odd_images], out=str(a.out / "odd")), code=0),
    Case("predict: segmentor header without feature_layers", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "nolayers.safetensors", feature_layers=None)), match="nolayers.safetensors.*feature_layers"),
    Case("predict: segmentor header with feature_layers as text", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "textlayers.safetensors", feature_layers="1")), match="textlayers.safetensors.*feature_layers"),
    Case("predict: segmentor header with num_classes text", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "classes.safetensors", num_classes="x")), match="classes.safetensors.*num_classes"),
    Case("predict: segmentor header with an UperNet head without channels", lambda a: a.predict(
         checkpoint=_segmentor_with(a, "head.safetensors", decode_head={"type": "upernet"})),
         match="head.safetensors.*channels"),
    Case("predict: segmentor header with a stride above the crop", lambda a: a.predict(
         checkpoint=_segmentor_with(a, "gaps.safetensors", meta={"stride": 100})), match="gaps.safetensors.*stride"),
    # ------------------------------------------------------------------ export
    Case("export: no --format", lambda a: a.export(), match="--format"),
    Case("export: --format pdf", lambda a: a.export("--format", "pdf"), match="--format"),
    Case("export: checkpoint missing", lambda a: a.export("--format", "onnx", checkpoint=str(a.scratch / "no.pth")),
         match="no.pth"),
    Case("export: onnx of a backbone", lambda a: a.export("--format", "onnx", checkpoint=a.teacher),
         match="not a segmentor"),
    Case("export: timm of junk", lambda a: a.export("--format", "timm", checkpoint=a.file("j.safetensors", b"\0" * 9),
                                                    out=str(a.out / "t")), match="j.safetensors"),
    Case("export: --size 0 0", lambda a: a.export("--format", "onnx", "--size", "0", "0"), match="--size"),
    Case("export: --size 33 33", lambda a: a.export("--format", "onnx", "--size", "33", "33"), match="multiples"),
    Case("export: --size 60000 60000", lambda a: a.export("--format", "onnx", "--size", "60000", "60000"),
         match="--size 60000 60000.*lower --size"),
    Case("export: --size of one number", lambda a: a.export("--format", "onnx", "--size", "64"), match="--size"),
    Case("export: --opset 7", lambda a: a.export("--format", "onnx", "--opset", "7"), match="--opset 7"),
    Case("export: --batch 0", lambda a: a.export("--format", "onnx", "--batch", "0"), match="--batch"),
    Case("export: --out is a folder", lambda a: a.export("--format", "onnx", out=a.folder("model.onnx")),
         match="model.onnx.*is a folder"),
    Case("export: --out is the user's file", lambda a: a.export("--format", "onnx", out=a.out_with(
         "mine", {"model.onnx": b"my model"}) + "/model.onnx"), match="model.onnx.*not written by unip"),
    Case("export: timm of a student with a 4-head last block", lambda a: a.export(
         "--format", "timm", checkpoint=a.checkpoint("student.safetensors", model={"last_heads": 4}),
         out=str(a.out / "t")), match="last block has 4 heads.*--last-block-heads default"),
    Case("export: --last-block-heads 7", lambda a: a.export("--format", "timm", "--last-block-heads", "7"),
         match="--last-block-heads"),
    Case("export: timm with --dynamic", lambda a: a.export("--format", "timm", "--dynamic", out=str(a.out / "t")),
         match="--format onnx"),
    Case("export: timm into the user's folder", lambda a: a.export("--format", "timm", out=a.out_with(
         "mine", {"config.json": '{"mine": 1}'})), match="config.json.*not written by unip"),
    # ------------------------------------------------------------------ bench
    Case("bench: checkpoint missing", lambda a: a.bench(checkpoint=str(a.scratch / "gone.safetensors")),
         match="gone.safetensors"),
    Case("bench: a backbone", lambda a: a.bench(checkpoint=a.teacher), match="not a segmentor"),
    Case("bench: --batch 0", lambda a: a.bench("--batch", "0"), match="--batch"),
    Case("bench: --iters 0", lambda a: a.bench("--iters", "0"), match="--iters"),
    Case("bench: --warmup -1", lambda a: a.bench("--warmup", "-1"), match="--warmup"),
    Case("bench: --size 33 33", lambda a: a.bench("--size", "33", "33"), match="multiples"),
    Case("bench: --size 60000 60000", lambda a: a.bench("--size", "60000", "60000"), match="lower --size"),
    Case("bench: unknown device", lambda a: a.bench("--device", "toaster"), match="--device"),
    Case("bench: --out the user's file", lambda a: a.bench("--out", a.out_with("mine", {"b.json": '{"mine": 1}'})
                                                           + "/b.json"), match="b.json.*not written by unip"),
    Case("bench: --out not writable", lambda a: a.bench("--out", str(a.out / "b.json")), setup=_read_only_out,
         match="--out .*b.json: cannot write in"),
    Case("bench: --out empty", lambda a: a.bench("--out", ""), match="--out: empty path"),
    # ------------------------------------------------------------------ round 2 (issue 27): headers that lie
    Case("info: segmentor header off by one block", lambda a: ["info", _segmentor_with(
         a, "deeper.safetensors", model={"depth": 2})], match="deeper.safetensors: does not fit .*missing blocks.1"),
    Case("info: segmentor header 1,000x larger than its tensors", lambda a: ["info", _segmentor_with(
         a, "huge.safetensors", model=HUGE_BACKBONE)], match="huge.safetensors: describes a ViT of .* holds only"),
    Case("evaluate: segmentor header 1,000x larger than its tensors", lambda a: a.evaluate(
         checkpoint=_segmentor_with(a, "huge.safetensors", model=HUGE_BACKBONE)), match="huge.safetensors.*holds only"),
    Case("predict: segmentor header 1,000x larger than its tensors", lambda a: a.predict(
         checkpoint=_segmentor_with(a, "huge.safetensors", model=HUGE_BACKBONE)), match="huge.safetensors.*holds only"),
    Case("predict: segmentor header with a 1,000x wider decode head", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "head.safetensors", decode_head={"type": "upernet", "channels": 8000, "pool_scales": [1, 2, 3, 6]})),
         match=r"head.safetensors: its weights are not those of the segmentor it describes \(shape mismatch "
               r"decode_head"),
    Case("evaluate: segmentor header with 1,000 classes", lambda a: a.evaluate(checkpoint=_segmentor_with(
         a, "classes.safetensors", num_classes=3000)), match="classes.safetensors: .*conv_seg.* vs \\(3000"),
    Case("info: segmentor header of a wider backbone", lambda a: ["info", _segmentor_with(
         a, "wide.safetensors", model={"embed_dim": 64})], match="wide.safetensors: .*(holds only|shape mismatch)"),
    Case("evaluate: release file whose keys describe 201 blocks", lambda a: a.evaluate(checkpoint=_release(
         a, "r201.pth", backbone__blocks__200__norm1__weight=torch.zeros(32))), match="r201.pth: .*holds only"),
    Case("predict: release file whose keys describe 201 blocks", lambda a: a.predict(checkpoint=_release(
         a, "r201.pth", backbone__blocks__200__norm1__weight=torch.zeros(32))), match="r201.pth: .*holds only"),
    Case("evaluate: segmentor header test_scale of 100,000 px", lambda a: a.evaluate(checkpoint=_segmentor_with(
         a, "scale.safetensors", meta={"test_scale": [100_000, 100_000]})),
         match=r"scale.safetensors: the header's test_scale \[100000, 100000\] must be .* <= 16384"),
    Case("predict: segmentor header crop_size 100,000", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "crop.safetensors", meta={"crop_size": 100_000, "stride": 100_000})),
         match="crop.safetensors: the header's sliding window .* must be"),
    Case("predict: segmentor header std 0", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "std.safetensors", meta={"normalization": {"mean": [0.5] * 3, "std": [0.0] * 3}})),
         match="std.safetensors: the header's normalization.std"),
    Case("predict: segmentor header with windows of 8192 px (they end at the image's edges)", lambda a: a.predict(
         checkpoint=_segmentor_with(a, "win.safetensors", meta={"crop_size": 8192, "stride": 8192})), code=0),
    # ------------------------------------------------------------------ two runs, one folder
    Case("finetune: --out held by a running finetune", lambda a: a.finetune(),
         setup=lambda a: a.live_lock(a.out / "ft"), match="--out .*ft: " + LIVE.format("finetune")),
    Case("finetune: --resume auto into a folder held by a running finetune", lambda a: a.finetune(
         "--resume", "auto"), setup=lambda a: a.live_lock(a.out / "ft"), match=LIVE.format("finetune")),
    Case("finetune: --out held by a running evaluate", lambda a: a.finetune(),
         setup=lambda a: a.live_lock(a.out / "ft", "unip evaluate"), match=LIVE.format("evaluate")),
    Case("finetune: a killed run's stale lock is taken over", lambda a: a.finetune(),
         setup=lambda a: stale_lock(a.out / "ft"), code=0, warn=STALE.format("finetune"), takes_over=True),
    Case("pretrain: --out held by a running pretrain", lambda a: a.pretrain(),
         setup=lambda a: a.live_lock(a.out / "run", "unip pretrain"), match="--out .*run: " + LIVE.format("pretrain")),
    Case("pretrain: a killed run's stale lock is taken over", lambda a: a.pretrain("--teacher-layer", "2"),
         setup=lambda a: stale_lock(a.out / "run", "unip pretrain"), code=0, warn=STALE.format("pretrain"),
         takes_over=True),
    Case("evaluate: --out held by a running evaluate", lambda a: a.evaluate(),
         setup=lambda a: a.live_lock(a.out / "eval", "unip evaluate"), match=LIVE.format("evaluate")),
    Case("evaluate: a killed run's stale lock is taken over", lambda a: a.evaluate(),
         setup=lambda a: stale_lock(a.out / "eval", "unip evaluate"), code=0, warn=STALE.format("evaluate"),
         takes_over=True),
    Case("predict: --out held by a running predict", lambda a: a.predict(),
         setup=lambda a: a.live_lock(a.out / "pred", "unip predict"), match=LIVE.format("predict")),
    Case("predict: a killed run's stale lock is taken over", lambda a: a.predict(),
         setup=lambda a: stale_lock(a.out / "pred", "unip predict"), code=0, warn=STALE.format("predict"),
         takes_over=True),
    Case("sweep run: --out held by a running sweep", lambda a: a.sweep(),
         setup=lambda a: a.live_lock(a.out / "sweep", "unip sweep run"), match=LIVE.format("sweep run")),
    Case("sweep run: dry run of a folder a running sweep holds", lambda a: a.sweep("--dry-run"),
         setup=lambda a: a.live_lock(a.out / "sweep", "unip sweep run"), code=0),
    Case("finetune: the lock file is a link to the user's file", lambda a: a.finetune(out=str(a.out / "ft")),
         setup=lambda a: (a.out.joinpath("ft").mkdir(), os.symlink(a.file("mine.txt", "keep me"),
                                                                   a.out / "ft" / ".unip.lock")),
         match="ft: cannot create its lock file"),
    Case("predict: the lock file holds the user's text", lambda a: a.predict(out=a.out_with(
         "mine", {".unip.lock": "my notes"})), match=r"\.unip\.lock: exists and is not a unip lock file"),
    # ------------------------------------------------------------------ files that leave the data set
    Case("finetune: a train split line ../../elsewhere/x", lambda a: a.finetune(data=a.labeled_copy(_appended(
         "train_infrared.txt", "../../elsewhere/x"))),
         match=r"train_infrared.txt, line \d+: '../../elsewhere/x' leads out of it through '..'"),
    Case("finetune: a train split line with an absolute path", lambda a: a.finetune(data=a.labeled_copy(_appended(
         "train_infrared.txt", a.images + "/img0.png"))), match=r"train_infrared.txt, line \d+: '/.*img0.png' is an "
                                                                r"absolute path; entries are paths relative to"),
    Case("finetune: a split line through a linked-to parent (..)", lambda a: a.finetune(data=a.labeled_copy(
         _appended("test_infrared.txt", "../JPEGImages/x"))), match=r"test_infrared.txt, line \d+: '../JPEGImages/x' "
                                                                   "leads out"),
    Case("finetune: a split line that stays inside (sub/../name)", lambda a: a.finetune(data=a.labeled_copy(
         lambda root: (root / "train_infrared.txt").write_text(
             "".join(f"sub/../{n}\n" for n in (root / "train_infrared.txt").read_text().split())))), code=0),
    Case("evaluate: a test split line ../x", lambda a: a.evaluate(data=a.labeled_copy(_appended(
         "test_infrared.txt", "../x"))), match=r"test_infrared.txt, line \d+: '../x' leads out"),
    Case("evaluate: a test split line /abs/x", lambda a: a.evaluate(data=a.labeled_copy(_appended(
         "test_infrared.txt", "/abs/x"))), match=r"test_infrared.txt, line \d+: '/abs/x' is an absolute path"),
    Case("check-seg: a split line ../../x", lambda a: ["data", "check-seg", a.labeled_copy(_appended(
         "train_infrared.txt", "../../x"))], match=r"problem\(s\)"),
    Case("finetune: a folder set whose classes.yaml points its train split outside", lambda a: a.finetune(
         "--dataset", "folder", data=_folder_set(a, "splits: {train: ../train.txt}\n")),
         match=r"classes.yaml: splits.train: '../train.txt' leads out"),
    Case("finetune: a folder set whose classes.yaml names an absolute split file", lambda a: a.finetune(
         "--dataset", "folder", data=_folder_set(a, "splits: {val: /etc/hostname}\n")),
         match=r"classes.yaml: splits.val: '/etc/hostname' is an absolute path"),
    Case("prepare: scut list line ../../outside/x.jpg", lambda a: ["data", "prepare", "scut", _scut_raw(
         a, "../../outside/x.jpg\n"), str(a.out / "p")], match=r"scut_train.txt, line 1: '../../outside/x.jpg' "
                                                                "leads out"),
    Case("prepare: scut list line with an absolute image path", lambda a: ["data", "prepare", "scut", _scut_raw(
         a, a.images + "/img0.png\n"), str(a.out / "p")], match=r"scut_train.txt, line 1: '/.*img0.png' is an "
                                                                  "absolute path"),
    Case("prepare: scut list line whose label leaves RAW", lambda a: ["data", "prepare", "scut", _scut_raw(
         a, "\nimages/a.jpg ../../gt/a_labelIds.png\n"), str(a.out / "p")],
         match=r"scut_train.txt, line 2: '../../gt/a_labelIds.png' leads out"),
    Case("prepare: mfnet split line with an absolute path", lambda a: ["data", "prepare", "mfnet", a.folder(
         "raw", {**MFNET_RAW, "train.txt": "/etc/00001D\n"}), str(a.out / "p")],
         match=r"train.txt, line 1: '/etc/00001D' is an absolute path"),
    # ------------------------------------------------------------------ unbounded sweeps
    Case("sweep run: 20,000 seeds", lambda a: a.sweep(sweep=a.sweep_file(seeds=list(range(20_000)))),
         match=r"20,000 cells \(20,000 seed\(s\) × 1 backbone.*more than max_cells \(10,000\).*max_cells: N"),
    Case("sweep run: dry run of 20,000 seeds", lambda a: a.sweep("--dry-run", sweep=a.sweep_file(
         seeds=list(range(20_000)))), match="20,000 cells"),
    Case("sweep run: layer-wise blocks × seeds over max_cells", lambda a: a.sweep(sweep=a.sweep_file(
         seeds=[0, 1, 2], max_cells=30, protocols={"layerwise": {"layers": "all"}}, analysis={"images": a.images})),
         match=r"36 cells \(3 seed\(s\) × 12 .*max_cells \(30\)"),
    Case("sweep run: max_cells 0", lambda a: a.sweep(sweep=a.sweep_file(max_cells=0)),
         match="max_cells must be a whole number >= 1"),
    Case("sweep run: max_cells as text", lambda a: a.sweep(sweep=a.sweep_file(max_cells="many")),
         match="max_cells must be a whole number >= 1, got many"),
    Case("sweep run: dry run of 60 seeds with max_cells raised", lambda a: a.sweep("--dry-run", sweep=a.sweep_file(
         seeds=list(range(60)), max_cells=60)), code=0),
    # ------------------------------------------------------------------ class names and palettes
    Case("predict: header with 1 colour and names [1, 2] for a 3-class head", lambda a: a.predict(
         checkpoint=_segmentor_with(a, "names.safetensors", meta={"class_names": [1, 2], "palette": [[0, 0, 0]]})),
         match=r"names.safetensors: its header's class_names \[1, 2\] is not a list of names and palette lists 1 "
               r"colour .* for a head of 3 classes"),
    Case("predict: header with 2 class names for a 3-class head", lambda a: a.predict(checkpoint=_segmentor_with(
         a, "two.safetensors", meta={"class_names": ["sky", "road"]})), match="two.safetensors: .*lists 2 names"),
    Case("info: header palette colour 300", lambda a: ["info", _segmentor_with(a, "p300.safetensors", meta={
         "palette": [[0, 0, 0], [300, 0, 0], [1, 2, 3]]})], match=r"p300.safetensors: .*palette .* not a list of "
                                                                   r"\[R, G, B\]"),
    Case("evaluate: header names of 22 classes", lambda a: a.evaluate(checkpoint=_segmentor_with(
         a, "n22.safetensors", meta={"class_names": [f"c{i}" for i in range(22)]})), match="n22.safetensors: .*22"),
    Case("predict: release file with 3 names for its 9 classes (a warning)", lambda a: a.predict(
         checkpoint=_release(a, "rel3.pth", {"CLASSES": ("a", "b", "c"), "PALETTE": [[1, 2, 3]] * 3})), code=0,
         warn=r"rel3.pth: meta.CLASSES lists 3 names .* and meta.PALETTE lists 3 colours .* for its 9 classes"),
    Case("info: release file with a palette of text (a warning)", lambda a: ["info", _release(
         a, "relp.pth", {"PALETTE": "red"})], code=0, warn=r"relp.pth: meta.PALETTE 'red' is not a list"),
    # ------------------------------------------------------------------ FIFOs and devices
    Case("predict: a FIFO named x.jpg in the input folder", lambda a: a.predict(inputs=[a.folder(
         "in", {"img0.png": Path(a.images, "img0.png").read_bytes()})]), setup=lambda a: a.fifo("in/x.jpg"), code=0),
    Case("predict: a FIFO given as INPUT", lambda a: a.predict(inputs=[a.fifo("cam.jpg")]),
         match="cam.jpg: not a regular file"),
    Case("predict: a FIFO named clip.mp4 in the input folder", lambda a: a.predict(inputs=[a.folder(
         "in", {"img0.png": Path(a.images, "img0.png").read_bytes()})]), setup=lambda a: a.fifo("in/clip.mp4"),
         code=0),
    Case("predict: a link to /dev/zero named z.png", lambda a: a.predict(inputs=[a.folder(
         "in", {"img0.png": Path(a.images, "img0.png").read_bytes()})]),
         setup=lambda a: (a.folder("in"), os.symlink("/dev/zero", a.scratch / "in" / "z.png")), code=0),
    Case("analyze: a FIFO among the images", lambda a: a.analyze(images=a.folder("in", {
         f"img{i}.png": Path(a.images, f"img{i}.png").read_bytes() for i in range(2)})),
         setup=lambda a: a.fifo("in/a.png"), code=0),
    Case("finetune: a listed training image that is a FIFO", lambda a: a.finetune(data=a.labeled_copy(_fifo_image)),
         match=r"\.jpg: not a regular file"),
    Case("check-seg: a listed image that is a FIFO", lambda a: ["data", "check-seg", a.labeled_copy(_fifo_image)],
         match=r"problem\(s\)"),
    # ------------------------------------------------------------------ split attention biases (regression)
    Case("info: q_bias without v_bias", lambda a: ["info", _split_bias(a, "qbias.safetensors")],
         match=r"qbias.safetensors: holds blocks.0.attn.q_bias but no blocks.0.attn.v_bias"),
    Case("info: v_bias without q_bias", lambda a: ["info", _split_bias(a, "vbias.safetensors", "v")],
         match=r"vbias.safetensors: holds blocks.0.attn.v_bias but no blocks.0.attn.q_bias"),
    Case("info: q_bias and v_bias of other lengths", lambda a: ["info", _split_bias(a, "qv.safetensors", "qv", 16)],
         match=r"qv.safetensors: blocks.0.attn.q_bias \(32,\) and blocks.0.attn.v_bias \(16,\) are not two halves"),
    Case("finetune: --pretrained with q_bias without v_bias", lambda a: a.finetune(
         pretrained=_split_bias(a, "qbias.safetensors")), match="qbias.safetensors: holds blocks.0.attn.q_bias"),
    Case("analyze: a model with q_bias without v_bias", lambda a: ["analyze", "--model", _split_bias(
         a, "qbias.safetensors"), "--images", a.images, "--out", str(a.out / "an")], match="qbias.safetensors: holds"),

    # ================================================================== issue 26: export precisions, bench rows, slurm
    Case("export: --precision int4", lambda a: a.export("--format", "onnx", "--precision", "int4"),
         match="--precision"),
    Case("export: --calibrate missing", lambda a: a.export("--format", "onnx", "--precision", "int8", "--calibrate",
                                                           str(a.scratch / "no-frames")),
         match="--calibrate .*not a folder"),
    Case("export: --calibrate is a file", lambda a: a.export("--format", "onnx", "--precision", "int8", "--calibrate",
                                                             a.file("frame.png", b"x")), match="not a folder"),
    Case("export: --calibrate empty", lambda a: a.export("--format", "onnx", "--precision", "int8", "--calibrate",
                                                         a.folder("empty")), match="empty: no image file"),
    Case("export: --calibrate of unreadable frames", lambda a: a.export(
         "--format", "onnx", "--precision", "int8", "--calibrate", a.folder("junk", {"a.png": b"no", "b.tif": b""})),
         match=r"junk: 2 image file\(s\), none readable"),
    Case("export: --keep-float bogus", lambda a: a.export("--format", "onnx", "--precision", "int8", "--keep-float",
                                                          "bogus"), match="--keep-float bogus: bogus is not a group"),
    Case("export: --keep-float with fp32", lambda a: a.export("--format", "onnx", "--keep-float", "attention"),
         match="--keep-float is an option of --precision int8"),
    Case("export: --min-agreement 101", lambda a: a.export("--format", "onnx", "--min-agreement", "101"),
         match="--min-agreement"),
    Case("export: --min-agreement nan", lambda a: a.export("--format", "onnx", "--min-agreement", "nan"),
         match="--min-agreement"),
    Case("export: --calibration-frames 0", lambda a: a.export("--format", "onnx", "--calibration-frames", "0"),
         match="--calibration-frames"),
    Case("export: timm with --precision int8", lambda a: a.export("--format", "timm", "--precision", "int8",
                                                                  out=str(a.out / "t")), match="--format onnx"),
    Case("bench: --modes sideways", lambda a: a.bench("--modes", "sideways"), match="--modes sideways"),
    Case("bench: --onnx-precisions int4", lambda a: a.bench("--onnx-precisions", "int4"), match="--onnx-precisions"),
    Case("bench: --threads 0", lambda a: a.bench("--threads", "0"), match="--threads"),
    Case("bench: --calibrate missing", lambda a: a.bench("--calibrate", str(a.scratch / "none")),
         match="--calibrate .*not a folder"),
    Case("sweep run: --launcher cloud", lambda a: a.sweep("--launcher", "cloud"), match="--launcher"),
    Case("sweep run: --launcher slurm with --gpus", lambda a: a.sweep("--launcher", "slurm", "--gpus", "2"),
         match="--gpus and --devices place cells on this machine"),
    Case("sweep run: --slurm-partition without --launcher slurm", lambda a: a.sweep("--slurm-partition", "gpu"),
         match="--slurm-partition is an option of --launcher slurm"),
    Case("sweep run: --slurm-time soon", lambda a: a.sweep("--launcher", "slurm", "--slurm-time", "soon"),
         match="--slurm-time 'soon'"),
    Case("sweep run: --slurm-option without =", lambda a: a.sweep("--launcher", "slurm", "--slurm-option", "h100"),
         match="give KEY=VALUE"),
    Case("sweep run: --slurm-gpus-per-job -1", lambda a: a.sweep("--launcher", "slurm", "--slurm-gpus-per-job", "-1"),
         match="--slurm-gpus-per-job"),
]


# ============================================================================================ thermal files
# Damaged FLIR files (issue #23), through `unip info FILE`: the reader every thermal verb shares. The files are
# built by the tests' FLIR writer (tests/thermal_files.py), then damaged one way each.
def _thermal(a: Inputs, name: str, build: Callable[..., bytes]) -> str:
    """``scratch/name`` holding ``build(writer)``, ``writer`` being tests/thermal_files.py."""
    import thermal_files

    return a.file(name, build(thermal_files))


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with ``value`` packed as ``fmt`` at ``offset``."""
    import struct

    changed = bytearray(data)
    struct.pack_into(fmt, changed, offset, value)
    return bytes(changed)


def _raw_record(w, width: int, height: int, raster: bytes) -> bytes:
    """An FFF frame whose only record is RawData declaring ``width`` x ``height`` and holding ``raster``."""
    import struct

    return w.fff([(0x01, struct.pack("<HHH", 2, width, height).ljust(32, b"\0") + raster)])


def _flir_jpeg(w, drop: Optional[int] = None, last: Optional[int] = None) -> bytes:
    """An R-JPEG of 7 FLIR segments; ``drop``: the segment left out; ``last``: segment 3's wrong count byte."""
    data = w.frame(w.scene(8, 10), header_order=">")
    jpeg = w.flir_jpeg(data, np.zeros((8, 8, 3), np.uint8), chunk=200, order=[n for n in range(7) if n != drop])
    if last is None:
        return jpeg
    fourth = -1
    for _ in range(4):
        fourth = jpeg.index(b"FLIR\0\x01", fourth + 1)
    return jpeg[:fourth + 7] + bytes([last]) + jpeg[fourth + 8:]


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_tiff(side: int) -> bytes:
    """A 16-bit TIFF header declaring ``side`` x ``side`` pixels, with 16 bytes of pixels."""
    import struct

    tags = [(256, 4, side), (257, 4, side), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
            (277, 3, 1), (278, 4, side), (279, 4, 16)]
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    ifd = struct.pack("<H", len(tags)) + entries
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(16)


THERMAL_CASES: List[Case] = [
    Case("info: a FLIR FFF frame", lambda a: ["info", _thermal(a, "ok.fff", lambda w: w.frame(w.scene(8, 10)))],
         code=0),
    Case("info: FFF frame cut inside a record", lambda a: ["info", _thermal(
         a, "cut.fff", lambda w: w.frame(w.scene(8, 10))[:-50])], match=r"cut.fff: FFF record 1 .*lies outside"),
    Case("info: FFF header cut short", lambda a: ["info", a.file("head.fff", b"FFF\0" + bytes(30))],
         match="head.fff: the FFF header .*lies outside the file's 34 bytes"),
    Case("info: FFF directory past the end", lambda a: ["info", _thermal(a, "dir.fff", lambda w: _patched(
         w.frame(w.scene(8, 10), header_order=">"), 0x18, ">I", 2 ** 31))], match="dir.fff: the FFF record directory"),
    Case("info: FFF record offset past the end", lambda a: ["info", _thermal(a, "off.fff", lambda w: _patched(
         w.frame(w.scene(8, 10)), 0x40 + 0x0C, "<I", 10 ** 9))], match=r"off.fff: FFF record 0 .*bytes 1000000000"),
    Case("info: FFF directory of 2**31 records", lambda a: ["info", _thermal(a, "many.fff", lambda w: _patched(
         w.frame(w.scene(8, 10)), 0x1C, "<I", 2 ** 31))], match="many.fff: .*claims 2147483648 records"),
    Case("info: FFF of an unknown version", lambda a: ["info", a.file("ver.fff", b"FFF\0" + bytes(60))],
         match="ver.fff: .*unknown version"),
    Case("info: FLIR AFF sequence", lambda a: ["info", a.file("aff.seq", b"AFF\0" + bytes(60))],
         match="aff.seq: an AFF sequence"),
    Case("info: FFF raster of 8-bit samples", lambda a: ["info", _thermal(a, "raw8.fff", lambda w: _raw_record(
         w, 10, 8, bytes(80)))], match="raw8.fff: raw thermal image holds 8-bit samples, not 16-bit"),
    Case("info: FFF raster shorter than declared", lambda a: ["info", _thermal(a, "short.fff", lambda w: _raw_record(
         w, 10, 8, bytes(100)))], match="short.fff: raw thermal image holds 100 bytes where 10 x 8"),
    Case("info: FFF PNG raster of 8 bits", lambda a: ["info", _thermal(a, "png8.fff", lambda w: _raw_record(
         w, 10, 8, _png_bytes(np.zeros((8, 10), np.uint8))))], match="png8.fff: PNG raster is 8-bit gray"),
    Case("info: FFF raster of 60000 x 60000", lambda a: ["info", _thermal(a, "huge.fff", lambda w: _raw_record(
         w, 60000, 60000, bytes(64)))], match="huge.fff: raw thermal image declares 60000 x 60000 pixels"),
    Case("info: FFF without a raw data record", lambda a: ["info", _thermal(a, "noraw.fff", lambda w: w.fff(
         [(0x20, w.camera_info(w.CALIBRATION, 10, 8))]))], match="noraw.fff: FFF frame 0 has no raw thermal data"),
    Case("info: SEQ whose second frame is cut", lambda a: ["info", _thermal(a, "clip.seq", lambda w: w.frame(
         w.scene(8, 10)) + w.frame(w.scene(8, 10))[:200])], match="clip.seq: .*lies outside the file's"),
    Case("info: CSQ with a broken JPEG-LS raster", lambda a: ["info", _thermal(a, "bad.csq", lambda w: _raw_record(
         w, 10, 8, b"\xff\xd8\xff\xf7\x00\x0b\x10\x00\x08\x00\x0a\x01" + bytes(40)))],
         match="bad.csq: (JPEG-LS raster cannot be decoded|reading its JPEG-LS raster)"),  # without imagecodecs
    Case("info: R-JPEG missing a FLIR segment", lambda a: ["info", _thermal(a, "gap.jpg", lambda w: _flir_jpeg(
         w, drop=2))], match=r"gap.jpg: has 6 of its 7 FLIR segments \(missing number 2\)"),
    Case("info: R-JPEG whose FLIR segments disagree on their count", lambda a: ["info", _thermal(
         a, "count.jpg", lambda w: _flir_jpeg(w, last=9))], match="count.jpg: FLIR segments disagree on their count"),
    Case("info: 16-bit TIFF of 100000 x 100000", lambda a: ["info", a.file("huge.tif", _huge_tiff(100000))],
         match="huge.tif: declares over 178956970 pixels"),
    Case("info: 16-bit TIFF of 9000 x 9000", lambda a: ["info", a.file("big.tif", _huge_tiff(9000))],
         match="big.tif: is 9000 x 9000 pixels"),
]
CASES += THERMAL_CASES


# ============================================================================================ thermal inputs
# Thermal-camera inputs of the verbs (issue #23): FLIR sequences with a damaged frame, a fixed °C window where there
# are no temperatures, bad windows, cameras that cannot be read, palette pictures. Files from tests/thermal_files.py.
def _seq_with_a_bad_frame(w) -> bytes:
    """A SEQ of 4 frames whose frame 1 holds 30 bytes where its raster needs 2 x 8 x 10."""
    import struct

    bad = w.fff([(0x01, struct.pack("<HHH", 2, 10, 8).ljust(32, b"\0") + bytes(30)),
                 (0x20, w.camera_info(w.CALIBRATION, 10, 8))])
    good = [w.frame(w.scene(8, 10, seed=seed)) for seed in range(3)]
    return good[0] + bad + good[1] + good[2]


def _palette_jpeg() -> bytes:
    """An iron-like palette picture of a generated scene (a radiometric JPEG's preview without its raster)."""
    import matplotlib
    import thermal_files

    unit = thermal_files.scene(96, 128).astype(float)
    unit = (unit - unit.min()) / np.ptp(unit)
    buffer = io.BytesIO()
    Image.fromarray((matplotlib.colormaps["inferno"](unit)[..., :3] * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _palette_soda(a: Inputs) -> str:
    """The shared SODA set with its first image replaced by a palette picture of the same size."""
    def damage(root: Path) -> None:
        images = root / "JPEGImages"
        path = images / sorted(os.listdir(images))[0]
        size = Image.open(path).size
        Image.open(io.BytesIO(_palette_jpeg())).resize(size).save(path, quality=95)
    return a.labeled_copy(damage)


THERMAL_INPUT_CASES: List[Case] = [
    Case("predict: a SEQ with a damaged frame in the middle", lambda a: a.predict(inputs=[_thermal(
         a, "bad.seq", _seq_with_a_bad_frame)]), code=1, match=r"1 input\(s\) could not be read"),
    Case("predict: --thermal-range on an 8-bit image", lambda a: a.predict("--thermal-range", "20:40"),
         match=r"img0.png: holds no temperatures \(an 8-bit picture\), so a fixed °C window \(--thermal-range\)"),
    Case("predict: --thermal-range on a 16-bit image without --tlinear", lambda a: a.predict(
         "--thermal-range", "20:40", inputs=[a.file("raw.png", _png_bytes(np.full((8, 10), 3000, np.uint16)))]),
         match="raw.png: holds no temperatures .*--tlinear"),
    Case("predict: --thermal-range on a video", lambda a: a.predict(
         "--thermal-range", "20:40", inputs=[a.file("clip.mp4", b"\x00\x00\x00 ftyp" * 20)]),
         match="clip.mp4: a video holds no temperatures"),
    Case("analyze: --thermal-range on 8-bit images", lambda a: a.analyze("--thermal-range", "20:40"),
         match=r"holds no temperatures \(an 8-bit picture\), so a fixed °C window \(--thermal-range\)"),
    Case("analyze: --thermal-range HIGH below LOW", lambda a: a.analyze("--thermal-range", "40:20"),
         match="--thermal-range 40:20: LOW must be below HIGH"),
    Case("predict: --compile of an unknown mode", lambda a: a.predict("--compile", "fastest"),
         match="--compile: invalid choice: 'fastest'"),
    Case("predict: --thermal-range HIGH below LOW", lambda a: a.predict("--thermal-range", "40:20"),
         match="--thermal-range 40:20: LOW must be below HIGH"),
    Case("predict: --thermal-range of one number", lambda a: a.predict("--thermal-range", "30"),
         match="--thermal-range '30': give LOW:HIGH"),
    Case("predict: --thermal-range of text", lambda a: a.predict("--thermal-range", "warm:hot"),
         match="--thermal-range 'warm:hot'"),
    Case("predict: --thermal-range below absolute zero", lambda a: a.predict("--thermal-range=-300:20"),
         match="absolute zero"),
    Case("predict: --emissivity 0", lambda a: a.predict("--emissivity", "0"), match="--emissivity"),
    Case("predict: --emissivity 1.5", lambda a: a.predict("--emissivity", "1.5"), match="--emissivity"),
    Case("predict: --tlinear -1", lambda a: a.predict("--tlinear", "-1"), match="--tlinear"),
    Case("predict: --max-frames 0", lambda a: a.predict("--max-frames", "0"), match="--max-frames"),
    Case("predict: --camera -1", lambda a: a.predict("--camera", "-1"), match="--camera"),
    Case("predict: a camera that cannot be opened", lambda a: ["predict", "--checkpoint", a.tiny_segmentor,
         "--camera", "63", "--out", str(a.out / "cam")], match="camera 63: OpenCV cannot open it"),
    Case("predict: a palette picture, named once", lambda a: a.predict(inputs=[a.folder(
         "iron", {"a.jpg": _palette_jpeg(), "b.jpg": _palette_jpeg()})]), code=0,
         warn=r"iron/a.jpg: a colour picture that looks like a thermal palette"),
    Case("infmix: a SEQ with a damaged frame", lambda a: ["data", "infmix", "--extra", a.folder(
         "rec", {"bad.seq": _seq_with_a_bad_frame(__import__("thermal_files"))}), "--out", str(a.out / "m.jsonl")],
         code=0),
    Case("infmix: --every 0", lambda a: ["data", "infmix", "--extra", a.images, "--every", "0", "--out",
                                        str(a.out / "m.jsonl")], match="--every"),
    Case("check-seg: a palette picture is named, not a problem", lambda a: ["data", "check-seg", _palette_soda(a)],
         code=0, warn="looks like a thermal palette"),
]
CASES += THERMAL_INPUT_CASES


# ============================================================================================ unip serve
# `unip serve` options (issue #24): every row fails before the server answers, or, for a warning, serves nothing
# (``Server.run`` returns at once) after binding a free port and loading the model.
def _serve(a: Inputs, *options: str) -> List[str]:
    return ["serve", "--checkpoint", a.tiny_segmentor, "--port", "0", *options]


def _no_serving(a: Inputs) -> None:
    a.monkeypatch.setattr("unip.serve.server.Server.run", lambda server: None)


def _port_in_use(a: Inputs) -> None:
    import socket

    taken = a.stack.enter_context(socket.socket())
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    a.taken_port = str(taken.getsockname()[1])


SERVE_CASES: List[Case] = [
    Case("serve: --port 70000", lambda a: _serve(a, "--port", "70000"), match="--port"),
    Case("serve: --port -1", lambda a: _serve(a, "--port", "-1"), match="--port"),
    Case("serve: --port http", lambda a: _serve(a, "--port", "http"), match="--port"),
    Case("serve: --port in use", lambda a: _serve(a, "--port", a.taken_port), setup=_port_in_use,
         match=r"--port \d+: 127.0.0.1:\d+ is in use .*pick another --port"),
    Case("serve: --host of another machine", lambda a: _serve(a, "--host", "203.0.113.7"),
         match="--host 203.0.113.7: not an address of this machine"),
    Case("serve: --host 0.0.0.0 warns", lambda a: _serve(a, "--host", "0.0.0.0"), code=0, setup=_no_serving,
         warn="--host 0.0.0.0: the page and its API answer every machine .* without a password"),
    Case("serve: --host 127.0.0.1 says nothing", lambda a: _serve(a, "--host", "127.0.0.1"), code=0,
         setup=_no_serving),
    Case("serve: --max-upload-mb 0", lambda a: _serve(a, "--max-upload-mb", "0"), match="--max-upload-mb"),
    Case("serve: --max-upload-mb 1.5", lambda a: _serve(a, "--max-upload-mb", "1.5"), match="--max-upload-mb"),
    Case("serve: --max-upload-mb 2000000", lambda a: _serve(a, "--max-upload-mb", "2000000"),
         match="--max-upload-mb"),
    Case("serve: --queue-size 0", lambda a: _serve(a, "--queue-size", "0"), match="--queue-size"),
    Case("serve: --compile of CUDA graphs on a CPU", lambda a: _serve(a, "--compile", "reduce-overhead", "--device",
                                                                      "cpu"), match="needs a CUDA device"),
    Case("serve: --every 0", lambda a: _serve(a, "--every", "0"), match="--every"),
    Case("serve: --checkpoint missing", lambda a: ["serve", "--checkpoint", str(a.scratch / "none.safetensors"),
                                                   "--port", "0"], match="none.safetensors"),
    Case("serve: --checkpoint of a backbone", lambda a: ["serve", "--checkpoint", a.teacher, "--port", "0"],
         match="teacher.safetensors"),
    Case("serve: --dataset of another class count", lambda a: _serve(a, "--dataset", "mfnet"),
         match="--dataset mfnet: 9 classes, but the checkpoint predicts 3"),
    Case("serve: no --checkpoint and no cached model", lambda a: ["serve", "--port", "0"],
         setup=lambda a: a.monkeypatch.setenv("UNIP_CACHE", str(a.scratch / "cache")),
         match="no --checkpoint given and no demo model cached in .*cache: give --checkpoint FILE"),
]
CASES += SERVE_CASES


# ============================================================================================ the check
def _snapshot(*roots: Path) -> Dict[str, str]:
    """Every file under ``roots`` → a hash of its bytes (folders → ``"dir"``; FIFOs, devices and links to them
    → ``"special"``, never opened)."""
    found: Dict[str, str] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(folder, name)] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                if not stat.S_ISREG(os.stat(path).st_mode):
                    found[path] = "special"
                    continue
                with open(path, "rb") as handle:
                    found[path] = hashlib.sha1(handle.read()).hexdigest()
    return found


def _inside(path: str, folder: Path) -> bool:
    return path == str(folder) or path.startswith(str(folder) + os.sep)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, shared, tmp_path, monkeypatch, capsys):
    a = Inputs(shared, tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    with a.stack:  # a lock held by another process lasts until the row is checked
        if case.setup:
            case.setup(a)
        argv = case.argv(a)
        before = _snapshot(shared, tmp_path)
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        after = _snapshot(shared, tmp_path)

    assert code == case.code, f"exit {code}, stderr: {err}"
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    if case.code:
        assert len(lines) == 1, err
        assert lines[0].startswith("unip") and re.search(case.match, lines[0]), lines[0]
    elif case.warn:
        assert len(lines) == 1 and re.match(r"unip [a-z -]+: warning: ", lines[0]), err
        assert re.search(case.warn, lines[0]), lines[0]
    else:
        assert err.strip() == ""
    replaced = (lambda path: os.path.basename(path) == ".unip.lock") if case.takes_over else (lambda path: False)
    changed = [p for p, digest in before.items() if after.get(p) != digest and not replaced(p)]
    assert not changed, f"changed or removed: {changed}"
    stray = [p for p in after if p not in before and not _inside(p, a.out)]
    assert not stray, f"written outside the output folder: {stray}"
    left = [p for p in a.out.rglob(".unip.lock") if str(p) not in before]
    assert not left, f"a lock was left behind: {left}"


def test_the_table_covers_every_verb():
    verbs = {case.id.split(":")[0] for case in CASES}
    assert {"info", "analyze", "pretrain", "finetune", "evaluate", "infmix", "stats", "pack", "synth",
            "demo", "predict", "export", "bench", "sweep run", "sweep report", "serve"} <= verbs
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)


# ============================================================================================ severe cases
def test_pack_never_deletes_a_user_folder_that_looks_like_a_pack(shared, tmp_path):
    """The data-loss case: a folder with a stray index.json next to the user's images and notes."""
    user = tmp_path / "photos"
    user.mkdir()
    (user / "index.json").write_text('{"format": "unip-packed", "version": 2}')  # even our format line
    (user / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    (user / "notes").mkdir()
    (user / "notes" / "todo.txt").write_text("keep me")
    before = _snapshot(user)
    assert main(["data", "pack", str(shared / "manifest.jsonl"), "--out", str(user)]) == 2
    assert _snapshot(user) == before
    # a stale partial folder of a killed pack that holds a user's file is left alone too
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"fresh.partial-{int(done.stdout)}"
    stale.mkdir()
    (stale / "mine.txt").write_text("not a shard")
    assert main(["data", "pack", str(shared / "manifest.jsonl"), "--out", str(tmp_path / "fresh")]) == 0
    assert (stale / "mine.txt").read_text() == "not a shard"
    # our own pack is still replaced by a repack
    assert main(["data", "pack", str(shared / "manifest.jsonl"), "--out", str(tmp_path / "fresh"),
                 "--short-side", "16"]) == 0
    assert json.loads((tmp_path / "fresh" / "index.json").read_text())["short_side"] == 16


def test_two_finetune_runs_into_one_folder_the_second_refused(shared, tmp_path):
    """The issue's case: a second ``unip finetune`` into the --out of one that runs stops at once (exit 2, one line
    naming the first by pid), and the first finishes as if alone: one log with one setup record, one TensorBoard
    file, its own final model."""
    a = Inputs(shared, tmp_path, None)
    argv = a.finetune("--iterations", "30", "--set", "debug.step_delay=0.5")  # 15 s: the second's start fits in
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "unip.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (a.out / "ft" / ".unip.lock").exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "unip.cli", *argv], env=env, capture_output=True, text=True,
                            timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"in use by unip finetune (pid {first.pid} on " in second.stderr
    records = [json.loads(line) for line in (a.out / "ft" / "log.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r.get("kind") == "setup") == 1
    assert len(list((a.out / "ft" / "tb").glob("events.out.tfevents.*"))) == 1
    assert (a.out / "ft" / "segmentor.safetensors").is_file() and not (a.out / "ft" / ".unip.lock").exists()


def test_odd_file_names_survive_pack_and_stats(shared, tmp_path):
    from unip.data.packed import PackedImages

    assert main(["data", "pack", str(shared / "odd.jsonl"), "--out", str(tmp_path / "p")]) == 0
    names = sorted(os.path.basename(p) for p in PackedImages(str(tmp_path / "p"), transform=None).paths())
    assert names == sorted(ODD_NAMES)
    assert main(["data", "stats", str(tmp_path / "p"), "--out", str(tmp_path / "s")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert list(stats["sources"]) == ["set\udcfeB"] and stats["overall"]["images"] == 3


_MEMORY_SCRIPT = r"""
import contextlib, io, json, os, resource, sys
import matplotlib.pyplot, torch, unip.analysis.run, unip.checkpoint, unip.data.synth
from unip.cli import main
mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limit = mapped + (2 << 30)  # what torch and the imports mapped, plus 2 GiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS as on Linux")
def test_memory_bound_under_an_address_space_limit(shared, tmp_path):
    """Under ``ulimit -v`` a small file describing a huge ViT (a backbone, or a segmentor whose header lies about
    its tensors: info, predict, evaluate) and sizes of 100000 px fail at once with a clear line (exit 2), instead
    of an allocation failure or the machine swapping."""
    a = Inputs(shared, tmp_path, None)
    huge = a.checkpoint("huge.safetensors", model={"embed_dim": 8192, "num_heads": 64, "depth": 48})
    deep = a.plain("deep.safetensors", _with(a.teacher_state(), blocks__99999__norm1__weight=torch.zeros(32)))
    huge_segmentor = _segmentor_with(a, "huge_seg.safetensors", model=HUGE_BACKBONE)
    runs = [["info", huge], ["info", deep], ["info", huge_segmentor], a.predict(checkpoint=huge_segmentor),
            a.evaluate(checkpoint=huge_segmentor),
            ["analyze", "--model", a.teacher, "--images", a.images, "--size", "100000", "--out", str(a.out / "an"),
             "--no-progress"],
            ["data", "synth", "--size", "100000x100000", "--num", "1", "--out", str(a.out / "s")]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    patterns = ["huge.safetensors.*holds only", "deep.safetensors.*blocks", *["huge_seg.safetensors.*holds only"] * 3,
                "--size.*lower --size", "--size"]
    for (code, err), pattern in zip(results, patterns):
        assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    assert "available" in results[5][1]


def test_timm_offline_fails_within_seconds(monkeypatch, capsys):
    a = Inputs.__new__(Inputs)
    a.monkeypatch = monkeypatch
    _offline_hub(a)
    start = time.perf_counter()
    assert main(["info", "timm:vit_tiny_patch16_224"]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "timm:vit_tiny_patch16_224@" in err


def test_timm_reads_its_cache_offline(monkeypatch):
    """Cached weights and no network: timm is called with the hub in offline mode (no retries)."""
    import timm
    from huggingface_hub import constants

    from unip.checkpoint.timm_hub import _create_timm

    a = Inputs.__new__(Inputs)
    a.monkeypatch = monkeypatch
    _offline_hub(a)
    monkeypatch.setattr("unip.checkpoint.timm_hub._hub_cached", lambda *args: True)
    seen = []
    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: seen.append(constants.HF_HUB_OFFLINE) or "m")
    assert _create_timm("vit_tiny_patch16_224", pretrained=True) == "m"
    assert seen == [True] and constants.HF_HUB_OFFLINE is False


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise ValueError("surprise\nsecond line")

    from unip import cli

    parser_run = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_run(), broken))
    assert main(["info", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unip info: internal error: ValueError: surprise second line; rerun with UNIP_DEBUG=1 for "
                   "the traceback"]
    monkeypatch.setenv("UNIP_DEBUG", "1")
    assert main(["info", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("unip info: internal error")


def test_memory_errors_are_one_line(monkeypatch, capsys):
    """Out of memory: one line whose fix names only the sizes the command line gave (none: not "lower the
    sizes")."""
    from unip import cli

    def exhausted(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 80000000000 bytes.")

    parser_run = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_run(), exhausted))
    assert main(["info", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unip info: error: out of memory")
    assert "lower --" not in err[0] and "gives no size or batch to lower" in err[0]

    from unip.memory import out_of_memory_fix

    assert out_of_memory_fix(["predict", "x.png", "--checkpoint", "m.safetensors"]).startswith("the command line "
                                                                                               "gives no size")
    assert out_of_memory_fix(["predict", "x.png", "--batch-size", "64", "--checkpoint", "m"]) == \
        "lower --batch-size (given on the command line)"
    assert out_of_memory_fix(["finetune", "--set", "data.crop_size=4096", "--set=optim.batch_size=64", "--set",
                              "run.seed=1", "--size=512"]) == \
        "lower --set data.crop_size, --set optim.batch_size, --size (given on the command line)"


def test_warnings_are_one_line_on_stderr_like_errors(monkeypatch, capsys):
    """A library's logged warning and a Python warning read the same: ``unip VERB: warning: ...`` on stderr, one
    line each; information stays on stdout."""
    import logging
    import warnings

    from unip import cli

    def noisy(args):
        log = logging.getLogger("unip.somewhere")
        log.info("working on %s", "x")
        log.warning("first line\nsecond line")
        warnings.warn("a library's warning")
        return 0

    parser_run = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_run(), noisy))
    assert main(["info", "x"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["working on x"]
    assert err.splitlines() == ["unip info: warning: first line second line", "unip info: warning: a library's warning"]


def _with_func(parser, func):
    """``parser`` whose ``info`` verb runs ``func``."""
    for action in parser._subparsers._group_actions:
        action.choices["info"].set_defaults(func=func)
    return parser


# ============================================================================================ building blocks
def test_rules_accept_what_they_describe():
    from unip.engine.config import integer, number, numbers, text

    layer = integer(1, 24, words=("auto",))
    assert [layer.accepts(v) for v in (1, 24, "auto", 0, 25, 2.0, True, "3", None)] == \
        [True, True, True, False, False, False, False, False, False]
    assert layer.describe() == "'auto' or an integer >= 1 and <= 24"
    lr = number(gt=0, le=1, null=True)
    assert [lr.accepts(v) for v in (None, 1e-4, 1, 0, float("nan"), float("inf"), "1e-4")] == \
        [True, True, True, False, False, False, False]
    scale = numbers(2, gt=0, le=1, ascending=True)
    assert scale.accepts([0.2, 1.0]) and not scale.accepts([0.9, 0.2]) and not scale.accepts([0.5])
    assert text("kl", "ce").accepts("kl") and not text("kl", "ce").accepts("mse") and not text().accepts("")
    with pytest.raises(__import__("argparse").ArgumentTypeError, match="an integer >= 1"):
        integer(1).option()("0")


def test_every_pretrain_setting_has_a_rule_that_its_presets_meet():
    from unip.distill.train import DEFAULTS, RULES, make_config
    from unip.engine.config import PRESET_ROOTS, flatten

    assert set(RULES) == set(flatten(DEFAULTS))
    presets = sorted({p.stem for root in PRESET_ROOTS for p in (root / "pretrain").glob("*.yaml")})
    assert len(presets) >= 6
    for name in [None, *presets]:
        make_config(name)  # raises ConfigError when a shipped default breaks its own rule


def test_a_setting_without_a_rule_may_be_null_only_where_its_default_is():
    from unip.engine.config import build_config
    from unip.errors import ConfigError

    defaults = {"a": {"n": 3, "m": None}}  # a task with a schema (rules), even an empty one
    assert build_config(defaults, None, ["a.m=null"], rules={})["a"]["m"] is None
    with pytest.raises(ConfigError, match=r"--set a\.n=null: a\.n must not be null"):
        build_config(defaults, None, ["a.n=null"], rules={})


@pytest.mark.parametrize("config", [
    {}, {"class_token": False, "embed_dim": 48, "num_heads": 3}, {"num_reg_tokens": 4, "no_embed_class": True},
    {"layer_scale": 1e-5, "qkv_bias": False, "mlp_ratio": 2.5, "in_chans": 1}, {"img_size": [48, 80], "patch_size": 8},
    {"last_heads": 4, "pos_embed_type": "sincos"}])
def test_expected_shapes_are_the_models(config):
    from unip.checkpoint import check_architecture, expected_shapes
    from unip.models.vit import VisionTransformer

    config = {"img_size": 32, "embed_dim": 32, "num_heads": 2, "depth": 2, **config}
    check_architecture(config, "test")
    model = VisionTransformer(**config)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_a_partial_file_loads_with_allow_partial_only_when_it_holds_most_weights(shared):
    from unip.checkpoint import check_fits, open_model
    from unip.errors import CheckpointError

    a = Inputs.__new__(Inputs)
    a.teacher = str(shared / "teacher.safetensors")
    state = a.teacher_state()
    config = open_model(a.teacher).model.config
    without_norm = {k: v for k, v in state.items() if not k.startswith("norm.")}
    check_fits(config, without_norm, "f", allow_partial=True)
    with pytest.raises(CheckpointError, match="f: does not fit .*missing norm.weight"):
        check_fits(config, without_norm, "f")
    with pytest.raises(CheckpointError, match="holds only"):
        check_fits(config, {k: v for k, v in state.items() if k.startswith("blocks.0.")}, "f", allow_partial=True)


def test_printable_text():
    from unip.text import one_line, printable

    assert printable("a\udcffb\nc") == "a\\xffb\\nc"
    assert one_line("first\n  second\tthird \udcfe") == "first second third \\xfe"
