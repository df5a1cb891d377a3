"""The paper's benchmark as a tool: ``unip sweep run`` fine-tunes and probes a grid of backbones × data sets ×
protocols × seeds, one ``unip finetune`` process per cell; ``unip sweep report`` turns the cells' ``metrics.json``
into the paper's table and figures (docs/sweep.md).

``spec``: the sweep file and its cells. ``cost``: what a cell costs (dry run). ``state``: the sweep folder and
``sweep.json``. ``run``: running the cells (resumable, one per device slot). ``report``: tables, figures, HTML.
"""

from unip.sweep.run import SweepRun, check_sweep, parse_devices, plan_sweep, plan_table, run_sweep
from unip.sweep.spec import Backbone, Cell, Dataset, Protocol, Sweep, parse_variables, plan_cells, read_sweep

__all__ = ["Backbone", "Cell", "Dataset", "Protocol", "Sweep", "SweepRun", "check_sweep", "parse_devices",
           "parse_variables", "plan_cells", "plan_sweep", "plan_table", "read_sweep", "run_sweep"]
