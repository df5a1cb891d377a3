"""Every command in README.md and docs/*.md is run or checked here, so none goes stale.

The rule (keep README.md to it):

* A code block right after the line ``<!-- readme-test: run -->`` is a session on generated data: its ``$ unip ...``
  lines run literally, in order, in one empty temporary folder, and each must exit 0. Lines without ``$ `` are the
  commands' output (not checked: numbers vary with the machine).
* Every other ``unip ...`` command (a line of a ``bash`` block, or after ``$ `` in a transcript) names the user's
  paths (``/data/...``, ``runs/...``): it must parse with the real argparse parser, and ``unip pretrain`` /
  ``unip finetune`` lines must also resolve their settings with ``--print-config`` (preset, options and ``--set``
  checked against the rules). ``torchrun ... -m unip.cli VERB ...`` is checked as ``unip VERB ...``.
* ``make TARGET`` must name a target of the Makefile (``make demo`` runs the demo; ``make test`` runs this).
* Blocks tagged ``text`` are output (e.g. the demo's summary) and ``python`` / ``bibtex`` ones are not commands; no
  other commands appear in README code blocks (``pip`` and the like go in the prose).
* docs/*.md follow the same rules for ``unip`` / ``torchrun`` lines (parsed, settings resolved); their other
  command lines may only run a script of ``benchmarks/`` (``python benchmarks/X.py ...``,
  ``OUT=... bash benchmarks/X.sh ...``), which must exist.
"""

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import List, Tuple

import pytest

from unip.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
RUN_MARK = "<!-- readme-test: run -->"


def code_blocks(text: str) -> List[Tuple[bool, List[str]]]:
    """``(runs literally, lines)`` of every fenced code block but output (``text``), Python, BibTeX, YAML, JSON."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        language = match.group(1)
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if language not in ("python", "bibtex", "yaml", "json", "text"):
            blocks.append((previous.strip() == RUN_MARK, lines[i + 1:end]))
        i = end + 1
    return blocks


def commands(block: List[str], transcript: bool) -> List[List[str]]:
    """The command lines of a block as argv lists (comments dropped, ``\\`` continuations joined)."""
    found, pending = [], ""
    for line in block:
        if transcript:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        words = shlex.split(pending, comments=True)
        pending = ""
        if words:
            found.append(words)
    return found


def readme_commands(page: Path = ROOT / "README.md") -> Tuple[List[List[str]], List[List[str]]]:
    """``(literal session commands, other commands)`` of a Markdown page (README.md by default)."""
    session, others = [], []
    for runs, block in code_blocks(page.read_text(encoding="utf-8")):
        transcript = any(line.startswith("$ ") for line in block)
        found = commands(block, transcript)
        (session if runs else others).extend(found)
    return session, others


def unip_argv(words: List[str]) -> List[str]:
    """``unip VERB ...`` or ``torchrun ... -m unip.cli VERB ...`` → ``[VERB, ...]``."""
    if words[0] == "unip":
        return words[1:]
    if words[0] == "torchrun":
        at = words.index("-m")
        assert words[at + 1] == "unip.cli", words
        return words[at + 2:]
    raise AssertionError(f"not a unip command: {' '.join(words)}")


def test_readme_has_commands_of_every_kind():
    session, others = readme_commands()
    assert len(session) >= 8 and all(words[0] == "unip" for words in session)
    kinds = {words[0] for words in others}
    assert {"make", "unip", "torchrun"} <= kinds
    assert kinds <= {"make", "unip", "torchrun"}, f"unchecked commands in README code blocks: {kinds}"


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for words in readme_commands()[1]:
        if words[0] == "make":
            assert words[1] in targets, words


def docs_commands() -> List[List[str]]:
    """Every command line of docs/*.md (none of them is a literal session)."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        session, others = readme_commands(page)
        assert not session, f"{page.name}: literal sessions belong in README.md"
        found.extend(others)
    return found


def test_docs_run_only_unip_and_benchmark_scripts():
    for words in docs_commands():
        if words[0] in ("unip", "torchrun"):
            continue
        script = next((w for w in words if w.startswith("benchmarks/")), None)
        assert script and (ROOT / script).is_file(), f"unchecked command in docs: {' '.join(words)}"


@pytest.mark.parametrize("words", [w for w in readme_commands()[1] + docs_commands() if w[0] in ("unip", "torchrun")],
                         ids=lambda w: " ".join(w)[:80])
def test_user_path_commands_parse_and_resolve(words):
    argv = unip_argv(words)
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on anything it does not accept
    if argv[0] in ("pretrain", "finetune") and "--print-config" not in argv:
        argv = argv + ["--print-config"]
    if argv[0] in ("pretrain", "finetune"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main(argv)
        assert code == 0, printed.getvalue()


def test_generated_data_session_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for words in readme_commands()[0]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main(unip_argv(words))
        assert code == 0, f"{' '.join(words)}:\n{printed.getvalue()[-2000:]}"
