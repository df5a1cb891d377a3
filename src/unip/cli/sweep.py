"""``unip sweep``: run a grid of fine-tuning and probing cells; report its table and figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unip.engine.config import integer
from unip.errors import ConfigError


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="the paper's benchmark: fine-tune and probe a grid of backbones; its table "
                                     "and figures",
                       description="Run a sweep file (configs/sweeps/: paper, tiny, or your own): backbones × data "
                                   "sets × protocols (ft, lp, layer-wise lp) × seeds, one unip finetune run per "
                                   "cell, resumable; then report the paper's table and figures. See docs/sweep.md.")
    verbs = p.add_subparsers(dest="sweep_verb", metavar="ACTION", required=True)

    q = verbs.add_parser("run", help="run (or resume) every cell of a sweep file",
                         description="Each cell is `unip finetune` in its own folder <out>/cells/<backbone>/<dataset>/"
                                     "<protocol>-seed<S>, run as a subprocess with --resume auto: finished cells "
                                     "(a valid metrics.json) are skipped, a killed cell continues from its own "
                                     "checkpoint, a failed cell is listed at the end (exit 1) and the others go on. "
                                     "With the layer-wise protocol, unip analyze profiles each backbone's NMI. "
                                     "State: <out>/sweep.json.")
    q.add_argument("sweep", metavar="SWEEP", help="sweep file (.yaml) or the name of a shipped one: paper, tiny")
    q.add_argument("--out", required=True, metavar="DIR", help="sweep folder (new, empty, or an earlier sweep's)")
    q.add_argument("--dry-run", action="store_true",
                   help="list the cells, what is finished or changed and the estimated cost, then make the run's "
                        "checks (exit 2 where it would stop); run nothing")
    q.add_argument("--gpus", type=integer(1, 4096).option(), metavar="N",
                   help="run N cells at a time, one per GPU (cuda:0 ... cuda:N-1)")
    q.add_argument("--devices", metavar="LIST", help="device slots, comma-separated: cuda:0,cuda:3 or cpu,cpu "
                                                    "(one cell on each at a time; default: one cell at a time, auto)")
    q.add_argument("--launcher", choices=("local", "slurm", "submitit-local"), default="local",
                   help="local (default): subprocesses on this machine's --gpus/--devices; slurm: each job one job "
                        "of a Slurm cluster through submitit (pip install 'unip[slurm]'), placed by the --slurm-* "
                        "options; submitit-local: the slurm path through submitit's local executor, on this machine")
    q.add_argument("--slurm-partition", metavar="NAME", help="slurm: the partition (default the cluster's)")
    q.add_argument("--slurm-account", metavar="NAME", help="slurm: the account to charge")
    q.add_argument("--slurm-time", metavar="TIME", default=None,
                   help="slurm: each job's time limit, minutes or H:MM:SS (default 12:00:00); a cell stopped by it "
                        "resumes from its checkpoint on the next run")
    q.add_argument("--slurm-gpus-per-job", type=integer(0, 64).option(), default=None, metavar="N",
                   help="slurm: GPUs per job (default 1; more run the cell under torchrun)")
    q.add_argument("--slurm-cpus-per-job", type=integer(1, 1024).option(), default=None, metavar="N",
                   help="slurm: CPU cores per job (default 8: data loading)")
    q.add_argument("--slurm-mem", metavar="SIZE", help="slurm: memory per job, e.g. 64G (default the partition's)")
    q.add_argument("--slurm-max-parallel", type=integer(1, 100_000).option(), default=None, metavar="N",
                   help="slurm: jobs of the sweep running at once (default as many as the cluster allows)")
    q.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: any other sbatch option, e.g. constraint=h100 or qos=high (repeatable)")
    q.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only the jobs whose id matches this shell pattern, e.g. '*/soda/ft-*' (repeatable)")
    q.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="value of ${NAME} in the sweep file, e.g. --var data=/data (repeatable)")
    q.set_defaults(func=_run_sweep_run)

    q = verbs.add_parser("report", help="the paper's table (CSV, Markdown), figures (PNG) and an HTML report",
                         description="Read every finished cell's metrics.json and each backbone's NMI profile: "
                                     "mIoU per data set and average for FT and LP, parameters and GFLOPs (backbone "
                                     "and heads, 512 px), mIoU per GFLOP; average mIoU against backbone GFLOPs per "
                                     "family with the paper's points; layer-wise LP curves next to NMI.")
    q.add_argument("sweep_dir", metavar="DIR", help="a sweep folder (unip sweep run --out)")
    q.add_argument("--out", metavar="DIR", help="report folder (default: DIR/report)")
    q.set_defaults(func=_run_sweep_report)


def _run_sweep_run(args: argparse.Namespace) -> int:
    from unip.sweep import parse_devices, parse_variables, plan_sweep, plan_table, read_sweep, run_sweep
    from unip.sweep.run import cell_jobs, check_sweep

    slurm = _slurm_settings(args)
    devices = parse_devices(args.gpus, args.devices)
    given = f"--gpus {args.gpus}" if args.gpus is not None else f"--devices {args.devices}"
    sweep = read_sweep(args.sweep, parse_variables(args.var), allow_unset=args.dry_run)
    if args.dry_run:
        cells = cell_jobs(sweep, Path(args.out))
        print(plan_table(plan_sweep(sweep, Path(args.out), args.only, cells)))
        if sweep.unset:
            print("not set yet: " + ", ".join(f"--var {name}=..." for name in sweep.unset))
        # then the run's checks: the dry run stops (exit 2) where the run would
        if slurm is not None:
            print(f"each job to run: one job of {slurm.describe()}")
        check_sweep(sweep, Path(args.out), ("auto",) if slurm else devices, args.only, cells, devices_option=given)
        return 0
    result = run_sweep(sweep, Path(args.out), devices, args.only, devices_option=given, slurm=slurm)
    done = sum(1 for status in result.status.values() if status == "done")
    print(f"sweep {sweep.name}: {done} of {len(result.jobs)} job(s) finished ({len(result.ran)} run now, "
          f"{len(result.skipped)} before); state {result.out / 'sweep.json'}")
    for job_id, error in result.failed:
        print(f"  FAILED {job_id}: {error}")
    if result.failed:
        print(f"unip sweep run: {len(result.failed)} job(s) failed (listed above; logs in their folders); run the "
              "same command again to retry them", file=sys.stderr)
        return 1
    print(f"next: unip sweep report {args.out}")
    return 0


def _slurm_settings(args: argparse.Namespace):
    """The ``SlurmSettings`` of ``--launcher slurm`` / ``submitit-local`` (None for the local launcher); a
    ``ConfigError`` for options of the other launcher."""
    from unip.sweep.slurm import DEFAULT_TIME_MIN, SlurmSettings, parse_options, parse_time

    given = [name for name in ("partition", "account", "time", "gpus_per_job", "cpus_per_job", "mem", "max_parallel")
             if getattr(args, f"slurm_{name}") is not None] + (["option"] if args.slurm_option else [])
    if args.launcher == "local":
        if given:
            raise ConfigError(f"--slurm-{given[0].replace('_', '-')} is an option of --launcher slurm")
        return None
    if args.gpus is not None or args.devices is not None:
        raise ConfigError(f"--gpus and --devices place cells on this machine; with --launcher {args.launcher} each "
                          "job gets --slurm-gpus-per-job GPUs instead")
    local = args.launcher == "submitit-local"
    gpus = args.slurm_gpus_per_job if args.slurm_gpus_per_job is not None else (0 if local else 1)
    return SlurmSettings(cluster="local" if local else "slurm", partition=args.slurm_partition,
                         account=args.slurm_account,
                         time_min=parse_time(args.slurm_time) if args.slurm_time else DEFAULT_TIME_MIN,
                         gpus_per_job=gpus, cpus_per_job=args.slurm_cpus_per_job or 8, mem=args.slurm_mem,
                         max_parallel=args.slurm_max_parallel, options=parse_options(args.slurm_option))


def _run_sweep_report(args: argparse.Namespace) -> int:
    from unip.sweep.report_folder import write_report

    report = write_report(args.sweep_dir, args.out)
    print(report.markdown)
    print(f"wrote {', '.join(sorted(p.name for p in report.files))} to {report.out}")
    return 0
