"""What every training loop shares: the loop itself (``trainer``: a task supplies model, loss, data and
evaluation), distributed set-up, optimiser groups, schedules, atomic training-state checkpoints with exact
resume, deterministic data order, logging and progress bars.

Modules (one concept each): ``trainer`` (``Task``, ``Trainer``, ``train_task``), ``distributed``
(process group, ``all_reduce_sum``, SyncBatchNorm, ``unwrap_model``), ``optim``, ``schedule``,
``checkpointing`` (training states, best model), ``data`` (seeded resumable training loaders, evaluation
loaders that keep every sample), ``loop`` (one optimiser step with accumulation, AMP, clipping and
non-finite detection), ``seeding``, ``logging``, ``progress``, ``config`` (YAML presets with
``--set key=value`` overrides).
"""
