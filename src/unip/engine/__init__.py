"""What every training loop shares: distributed set-up, optimiser groups, schedules, atomic training-state
checkpoints with exact resume, deterministic data order, logging and progress bars.

Modules (one concept each): ``distributed``, ``optim``, ``schedule``, ``checkpointing``, ``data``,
``loop`` (one optimiser step with accumulation, AMP, clipping and non-finite detection), ``logging``,
``progress``, ``config`` (YAML presets with ``--set key=value`` overrides).
"""
