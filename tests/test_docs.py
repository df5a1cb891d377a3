"""The docs stand alone and agree with the code.

* No file of the repository cites notes its readers do not have (the design notes or the folder shared beside the
  checkout); tests may read the real thermal files of that folder, nothing else of it.
* Every link to a heading of a page (``docs/recipe.md#fine-tuning`` in code, ``(#anchor)`` inside a page) names
  a heading of that page, by GitHub's anchor rule.
* The tables of docs/recipe.md hold the numbers the shipped presets resolve to (read through the task's own
  ``make_config``, so presets may name bases and move values around), and the class lists, split files, model
  shapes and paper results the code uses.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest

from unip.data import layouts
from unip.engine.config import flatten, list_presets
from unip.models import preset_config
from unip.sweep.paper import PAPER_POINTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECIPE = DOCS / "recipe.md"

# Written in two parts so that this file does not cite them itself.
OUTSIDE_NOTES = ("DESI" + "GN.md", "../" + "shared/", "checkpoint-" + "layouts.md", "seed-" + "README")
THERMAL_TEST_FILES = "../" + "shared/data/thermal/"


# ------------------------------------------------------------------------------------------- files and links
def tracked_files() -> List[Path]:
    """The repository's tracked files (git), or, outside a git checkout, the folders a release ships."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [name for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for top in ("src", "docs", "tests", "benchmarks")
                 for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        names += [name for name in ("README.md", "Makefile", "pyproject.toml") if (ROOT / name).is_file()]
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def text_of(path: Path) -> str:
    """The file's text, or "" for a binary file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def citing_lines(text: str, in_tests: bool) -> List[int]:
    """Numbers of the lines citing notes outside the repository (in tests, the thermal files are allowed)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        cited = [note for note in OUTSIDE_NOTES if note in line]
        if in_tests and cited == [OUTSIDE_NOTES[1]] and THERMAL_TEST_FILES in line:
            continue
        if cited:
            found.append(number)
    return found


PRESETS = ROOT / "src" / "unip" / "configs"


@pytest.mark.parametrize("presets", [False, True], ids=["code-docs-tests", "presets"])
def test_nothing_cites_notes_outside_the_repository(presets):
    found = []
    for path in tracked_files():
        if (PRESETS in path.parents) != presets:
            continue
        lines = text_of(path).splitlines()
        for number in citing_lines(text_of(path), path.relative_to(ROOT).parts[0] == "tests"):
            found.append(f"{path.relative_to(ROOT)}:{number}: {lines[number - 1].strip()}")
    assert not found, ("cite docs/recipe.md (or the paper, the release's files) instead:\n" + "\n".join(found))


def test_outside_citations_are_found():
    """The check itself: each pattern is caught, in tests too; a test's thermal-file path is not."""
    text = "\n".join([f"see {note} for this" for note in OUTSIDE_NOTES] + [f"read {THERMAL_TEST_FILES}x.jpg"])
    assert citing_lines(text, in_tests=True) == list(range(1, len(OUTSIDE_NOTES) + 1))
    assert citing_lines(text, in_tests=False) == list(range(1, len(OUTSIDE_NOTES) + 2))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation dropped (``-`` and ``_`` kept), spaces → ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def markdown_lines(text: str) -> List[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return kept


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset:
    """Every anchor of a page's headings (a repeated heading gets ``-1``, ``-2``, ... as on GitHub)."""
    found: Dict[str, int] = {}
    names = set()
    for line in markdown_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        names.add(f"{anchor}-{found[anchor]}" if anchor in found else anchor)
        found[anchor] = found.get(anchor, 0) + 1
    return frozenset(names)


LINK = re.compile(r"(?<![\w./-])([\w./-]*?)([\w-]+\.md)#([\w-]+)|\]\(#([\w-]+)\)")


def anchor_links(path: Path) -> List[Tuple[Path, str, str]]:
    """``(target page, anchor, as written)`` of every link to a heading of a page (``X.md#name``), or of its own
    page (``](#name)``)."""
    links = []
    for match in LINK.finditer(text_of(path)):
        folder, name, anchor, local = match.groups()
        if local:
            links.append((path, local, match.group(0)))
            continue
        if name == "README.md" and "docs" not in folder:
            target = ROOT / "README.md"
        else:
            target = DOCS / name
        links.append((target, anchor, match.group(0)))
    return links


def test_heading_anchors_follow_githubs_rule():
    assert github_anchor("The paper's results") == "the-papers-results"
    assert github_anchor("4. Transforms (mmsegmentation 0.x semantics)") == "4-transforms-mmsegmentation-0x-semantics"
    assert github_anchor("2. `unip data prepare mfnet|scut RAW OUT`") == "2-unip-data-prepare-mfnetscut-raw-out"
    assert github_anchor("Heads of the last block: two choices") == "heads-of-the-last-block-two-choices"


def test_every_anchor_link_names_a_heading():
    pages = [p for p in tracked_files() if p.suffix in (".md", ".py", ".yaml", ".yml", ".sh")
             and p != Path(__file__).resolve()]  # this file writes link patterns, not links
    broken = []
    for path in pages:
        for target, anchor, written in anchor_links(path):
            if not target.is_file() or anchor not in anchors(target):
                broken.append(f"{path.relative_to(ROOT)}: {written}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)


def test_code_cites_the_recipe_page():
    """The recipe is cited from the code (the point of the page), and each such citation was checked above."""
    cited = {anchor for path in (ROOT / "src").rglob("*.py") for target, anchor, _ in anchor_links(path)
             if target == RECIPE}
    assert {"fine-tuning", "test-pipeline", "layer-wise-lr-decay", "students"} <= cited


# ------------------------------------------------------------------------------------------- recipe tables
Row = Dict[str, str]


def recipe_sections() -> Dict[str, List[str]]:
    """Heading text → the page's lines up to the next heading of any level."""
    sections: Dict[str, List[str]] = {}
    current = ""
    for line in markdown_lines(RECIPE.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        else:
            sections.setdefault(current, []).append(line)
    return sections


def tables(lines: Sequence[str]) -> List[List[Row]]:
    """The Markdown tables among ``lines``: rows as ``{header: cell}``."""
    found, block = [], []
    for line in list(lines) + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) > 2:
            found.append([dict(zip(block[0], cells)) for cells in block[2:]])
        block = []
    return found


def table(section: str, column: str = "") -> List[Row]:
    """The table of a section of docs/recipe.md (the one that has ``column``, when given)."""
    found = [rows for rows in tables(recipe_sections()[section]) if not column or column in rows[0]]
    assert len(found) == 1, f"docs/recipe.md, {section}: expected one table, found {len(found)}"
    return found[0]


NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?![\d.])|\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def numbers(cell: str) -> List[float]:
    """The numbers written in a cell (``14,400`` is one number)."""
    return [float(text.replace(",", "")) for text in NUMBER.findall(cell)]


def code_words(cell: str) -> List[str]:
    return re.findall(r"`([^`]+)`", cell)


def agrees(cell: str, value: Any) -> bool:
    """Whether a recipe cell states ``value``: yes/no, a `code` word, or the same numbers in order."""
    if isinstance(value, bool):
        return cell.lower() == ("yes" if value else "no")
    if isinstance(value, str):
        return code_words(cell) == [value]
    if isinstance(value, (int, float)):
        return numbers(cell) == [float(value)]
    if isinstance(value, (list, tuple)):
        return numbers(cell) == [float(v) for v in value]
    return False


@lru_cache(maxsize=None)
def resolved(kind: str, preset: str) -> Dict[str, Any]:
    """A preset's resolved settings, flat (``{"optim.lr": 1e-4, ...}``), as ``unip pretrain/finetune`` use them."""
    if kind == "pretrain":
        from unip.distill.train import make_config
        config = make_config(preset)
    else:
        from unip.seg.train import make_config
        config = make_config(preset, kind=kind)
    flat = flatten(config)
    if flat.get("eval.stride", 0) is None:  # null: two thirds of the crop (docs/recipe.md#test-pipeline)
        flat["eval.stride"] = flat["data.crop_size"] * 2 // 3
    return flat


def recipe_presets(kind: str) -> List[str]:
    """The presets the recipe speaks for: the teachers' (pre-training), or the data sets' patterns (the others)."""
    if kind == "pretrain":
        names = sorted({name for row in table("Teachers and distilled layers") for name in code_words(row["presets"])})
    else:
        patterns = [p for row in table("Schedule per data set") for p in code_words(row["presets"])]
        names = sorted(n for n in list_presets(kind) if any(fnmatch.fnmatch(n, p) for p in patterns))
    assert names and set(names) <= set(list_presets(kind)), (kind, names)
    return names


#: Sections whose tables have a ``key`` column, and the kinds of preset their values are checked against.
KEYED_SECTIONS = {
    "Students": ("pretrain",), "Pre-training": ("pretrain",), "Fine-tuning settings": ("finetune",),
    "Training pipeline": ("finetune", "linprobe"), "Test pipeline": ("finetune", "linprobe"),
    "Linear probing": ("linprobe",),
}


def keyed_rows() -> List[Tuple[str, Row]]:
    return [(section, row) for section in KEYED_SECTIONS for row in table(section, "key")
            if code_words(row["key"])]


def test_every_keyed_table_is_checked():
    keyed = {section for section, lines in recipe_sections().items()
             for rows in tables(lines) if rows and "key" in rows[0]}
    assert keyed == set(KEYED_SECTIONS)
    assert len(keyed_rows()) >= 40


@pytest.mark.parametrize("section, row", keyed_rows(),
                         ids=lambda x: x if isinstance(x, str) else code_words(x["key"])[0])
def test_recipe_value_is_the_presets(section, row):
    key = code_words(row["key"])[0]
    for kind in KEYED_SECTIONS[section]:
        for preset in recipe_presets(kind):
            value = resolved(kind, preset)[key]
            assert agrees(row["value"], value), (
                f"docs/recipe.md, {section}, {row['setting'] if 'setting' in row else row['step']}: "
                f"{row['value']!r}, but {kind} preset {preset} resolves {key} to {value!r}")


@pytest.mark.parametrize("column, key", [
    ("iterations", "optim.iterations"), ("warm-up iterations", "optim.warmup_iterations"),
    ("evaluation every", "run.eval_every")])
def test_schedule_per_data_set_is_the_presets(column, key):
    for row in table("Schedule per data set"):
        pattern = code_words(row["presets"])[0]
        for kind in ("finetune", "linprobe"):
            for preset in fnmatch.filter(recipe_presets(kind), pattern):
                assert agrees(row[column], resolved(kind, preset)[key]), (row["data set"], column, kind, preset)


@pytest.mark.parametrize("column, key", [
    ("backbone", "model.backbone"), ("drop path", "model.drop_path"), ("per-GPU batch", "optim.batch_size")])
def test_model_sizes_are_the_finetuning_presets(column, key):
    for row in table("Model sizes"):
        presets = fnmatch.filter(recipe_presets("finetune"), code_words(row["presets"])[0])
        assert len(presets) == 3, row["size"]  # one per data set
        for preset in presets:
            assert agrees(row[column], resolved("finetune", preset)[key]), (row["size"], column, preset)


def test_teachers_layers_are_the_presets():
    shapes = {"ViT-L/16": "vit_large_patch16", "ViT-B/16": "vit_base_patch16"}
    for row in table("Teachers and distilled layers"):
        arch = preset_config(shapes[row["architecture"]])
        assert numbers(row["width"] + " " + row["depth"] + " " + row["heads"]) == [
            arch["embed_dim"], arch["depth"], arch["num_heads"]], row["teacher"]
        for preset in code_words(row["presets"]):
            assert agrees(row["distilled layer"], resolved("pretrain", preset)["teacher.layer"]), preset


def test_students_are_the_model_presets():
    shapes = table("Students", "preset")
    assert [code_words(row["preset"])[0] for row in shapes] == [f"unip_vit_{s}_patch16" for s in ("tiny", "small",
                                                                                                  "base")]
    for row in shapes:
        arch = preset_config(code_words(row["preset"])[0])
        assert numbers(" ".join(row[c] for c in ("patch", "width", "depth", "heads"))) == [
            arch["patch_size"], arch["embed_dim"], arch["depth"], arch["num_heads"]], row["model"]


def test_data_set_splits_are_the_layouts():
    splits = {"SODA": layouts.SODA_SPLITS, "MFNet": layouts.MFNET_SPLITS, "SCUT-Seg": layouts.SCUT_SPLITS}
    columns = {"train split": "train", "validated on": "val", "reported on": "test"}
    for section in ("Data sets", "Schedule per data set"):
        for row in table(section):
            for column, split in columns.items():
                if column in row:
                    assert code_words(row[column]) == [splits[row["data set"]][split]], (section, row["data set"])


def test_class_lists_are_the_layouts():
    rows = table("Classes")
    column = {name: [row[name] for row in rows if row[name]] for name in rows[0]}
    assert [int(i) for i in column["id"]] == list(range(len(layouts.SODA_CLASSES)))
    assert tuple(column["SODA"]) == layouts.SODA_CLASSES
    assert tuple(column["MFNet"]) == layouts.MFNET_CLASSES
    assert tuple(column["SCUT-Seg"]) == layouts.SCUT_CLASSES
    assert tuple(int(i) for i in column["SCUT-Seg original id"]) == layouts.SCUT_RAW_IDS


def test_paper_results_are_the_sweeps_reference_points():
    written = {row["model"]: (numbers(row["fine-tuning"]), numbers(row["linear probing"]))
               for row in table("The paper's results")}
    assert written == {p.name: ([p.ft], [p.lp]) for p in PAPER_POINTS}
