"""A training run's folder: the names of what a run keeps there, and what may be there before a run starts.

A run folder may be new or one unip wrote. ``check_run_folder`` refuses the rest before any work, so that a run
never overwrites or appends to a user's file, and never fails once training has started; ``refuse_other_run``
keeps a new run from starting over an earlier one (``--resume auto`` continues that one instead).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from unip.engine import checkpointing
from unip.engine.config import read_yaml
from unip.engine.logging import LOG_FILE, RECORD_KEYS, TB_DIR
from unip.errors import ConfigError
from unip.outputs import Recogniser, claim, is_our_jsonl, is_our_yaml, out_folder

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
#: sub-folders of a run folder
RUN_FOLDERS = (CHECKPOINT_DIR, TB_DIR)


def check_run_folder(folder: str, sections: Sequence[str], files: Dict[str, Recogniser],
                     resume: Optional[str]) -> None:
    """``ConfigError`` unless ``folder`` may hold this run: its config.yaml (a mapping of the run's ``sections``),
    log.jsonl and ``files`` (name → recogniser) must be unip's, and its checkpoints/ and tb/ must be folders (or
    absent). A new run (no ``resume``) may not start over another run's training states, nor over a finished run
    (its final model, the first of ``files``, and its log: ``refuse_other_run``)."""
    out_folder(folder, "--out")
    config_file = os.path.join(folder, CONFIG_FILE)
    missing = _sections_missing_from_run_config(config_file, sections)
    if missing:
        raise ConfigError(f"{folder}: holds another kind of unip run (its {CONFIG_FILE} has no {', '.join(missing)} "
                          "section); choose another --out")
    claim([config_file], is_our_yaml(list(sections)), "--out")
    claim([os.path.join(folder, LOG_FILE)], is_our_jsonl(RECORD_KEYS), "--out")
    for name, recognise in files.items():
        claim([os.path.join(folder, name)], recognise, "--out")
    for name in RUN_FOLDERS:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ConfigError(f"{path}: is a file where unip keeps the run's {name}/ folder; move it away or "
                              "choose another --out")
    if not resume:
        refuse_other_run(folder, next(iter(files), None))


def _sections_missing_from_run_config(path: str, sections: Sequence[str]) -> List[str]:
    """The ``sections`` that ``path`` lacks when it is another verb's run config (a YAML mapping with ``run`` and
    ``optim`` sections: ``unip finetune``'s in a ``unip pretrain`` folder, or the reverse); ``[]`` otherwise (no
    such file, this verb's config, or not a run config at all)."""
    try:
        document = read_yaml(path)
    except Exception:  # absent, unreadable or not YAML: ``claim`` reports it
        return []
    if not isinstance(document, dict) or not {"run", "optim"} <= set(document):
        return []
    return sorted(set(sections) - set(document))


def refuse_other_run(output: Union[str, Path], model_file: Optional[str] = None) -> None:
    """``ConfigError`` when a new run (no ``run.resume``) would start in a folder holding another run's training
    states or best model (pruning would delete the new run's states and ``--resume auto`` would continue the old
    one), or, given the task's ``model_file``, a finished run's final model and log whose states were deleted
    (the new run would replace the model and append to the log)."""
    ckpt_dir = Path(output) / CHECKPOINT_DIR
    latest = checkpointing.find_latest(ckpt_dir)
    best = [name for name in (checkpointing.BEST_JSON, checkpointing.BEST_WEIGHTS) if (ckpt_dir / name).exists()]
    if latest is None and not best:
        finished = [name for name in (model_file, LOG_FILE) if name and (Path(output) / name).exists()]
        if model_file and len(finished) == 2:
            raise ConfigError(f"{output} already holds a finished run ({', '.join(finished)}); choose another "
                              "--out, or move those files away to start a new run there")
        return
    found = f"training states up to step {checkpointing.state_step(latest)}" if latest is not None \
        else f"a best model ({', '.join(best)})"
    raise ConfigError(f"{output} already holds an earlier run ({found} in {ckpt_dir}); pass --resume auto to "
                      f"continue it, choose another --out, or delete {ckpt_dir}")
