"""``unip demo``: the whole UNIP pipeline at toy scale, offline, on a CPU (docs/demo.md).

``pipeline`` runs the stages through the CLI, ``settings`` holds the full and ``--fast`` sizes, ``cache`` keeps
the teacher the demo makes, ``summary`` reads the stages' files back into the summary table, JSON and figure.
"""

from unip.demo.pipeline import run_demo
from unip.demo.settings import FAST, FULL, DemoSettings, TeacherRecipe

__all__ = ["FAST", "FULL", "DemoSettings", "TeacherRecipe", "run_demo"]
