"""Run an ablation sweep (hybrid ratio, layer placement, recall suite) and write its report.

Every cell trains an MQAR model (recall) and, unless the sweep has none, a byte-level LM
(held-out loss, bits per byte, passkey), each in its own workdir under WORKDIR; the report is
WORKDIR/results.csv, results.md and PNG plots. A finished job is skipped, so a killed sweep
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EPILOG = """examples:
  python scripts/ablate.py --config configs/ablations/hybrid_ratio.py:preset=cpu --workdir runs/ratio --dry-run
  python scripts/ablate.py --config configs/ablations/hybrid_ratio.py:preset=cpu --workdir runs/ratio
  python scripts/ablate.py --config configs/ablations/layer_swap.py:preset=cpu --workdir runs/swap --shard 0/2
  python scripts/ablate.py --config configs/ablations/hybrid_ratio.py:preset=cpu --workdir runs/ratio --report-only
"""


def _shard(spec: str) -> tuple[int, int]:
    from train.sweep import SweepError, parse_shard
    try:
        return parse_shard(spec)
    except SweepError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="sweep config file and its argument, e.g. "
                        "configs/ablations/hybrid_ratio.py:preset=cpu (default: none, required)")
    p.add_argument("--workdir", required=True,
                   help="the sweep's folder: job workdirs, results.csv/.md and plots "
                        "(default: none, required)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells with parameters, FLOPs/token and cache bytes and the "
                        "estimated time; train nothing (default: off)")
    p.add_argument("--only", metavar="REGEX", default=None,
                   help="run only the cells whose name matches REGEX (default: all)")
    p.add_argument("--shard", metavar="I/N", default=None, type=_shard,
                   help="run the cells with index ≡ I (mod N), for a job array (default: all)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from whatever has finished; train nothing "
                        "(default: off)")
    p.add_argument("--verbose", action="store_true",
                   help="show each job's training log (default: one line per job)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.cli_config import load_config_file
    from train.interrupt import Interrupted
    from train.sweep import SweepError, cell_costs, collect_rows, plan_jobs, run_jobs
    from train.sweep_jobs import run_job
    from train.sweep_report import write_report
    from zoo.config import ConfigError
    try:
        sweep = load_config_file(args.config)
        shard = args.shard or (0, 1)
        jobs = plan_jobs(sweep, only=args.only, shard=shard)
        title = f"{sweep.name} ({sweep.preset} preset)"
        if args.dry_run:
            _dry_run(sweep, jobs, cell_costs)
            return 0
        if not args.report_only:
            run_jobs(jobs, args.workdir, say=print,
                     runner=lambda job, wd: run_job(job, wd, sweep=sweep,
                                                    quiet=not args.verbose))
        all_jobs = plan_jobs(sweep, only=args.only)   # the report covers every shard
        paths = write_report(collect_rows(sweep, args.workdir, all_jobs), args.workdir, title)
    except (SweepError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:   # the job saved a checkpoint; the sweep resumes from it
        print(f"stopped: {e}; rerun the same ablate command to resume the sweep",
              file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped: interrupted between jobs; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print("report: " + ", ".join(paths))
    return 0


def _dry_run(sweep, jobs, cell_costs) -> None:
    from train.sweep import _cost_len
    seq = _cost_len(sweep)
    print(f"{'job':6s} {'name':26s} {'layers':36s} {'params':>9s} {'GFLOP/tok':>9s} "
          f"{'cache@2k':>10s} {'cache@32k':>10s} {'steps':>6s}")
    total_s = 0.0
    for job in jobs:
        c = cell_costs(sweep, job.layer_types, seq)
        steps = int(job.config["train"]["steps"])
        per_step = sweep.seconds_per_step
        total_s += steps * float(per_step.get(job.mixer, per_step.default)) + 25.0
        print(f"{job.kind:6s} {job.name:26s} {','.join(job.layer_types):36s} "
              f"{c['params']:>9,} {c['flops_per_token'] / 1e9:>9.4f} "
              f"{c['cache_bytes_2k'] / 2**20:>8.2f}Mi {c['cache_bytes_32k'] / 2**20:>8.2f}Mi "
              f"{steps:>6d}")
    print(f"{len(jobs)} jobs; estimated {time.strftime('%H:%M:%S', time.gmtime(total_s))}: "
          f"steps × the preset's measured seconds per step "
          f"({dict(sweep.seconds_per_step.to_dict())}) + 25 s per job of compilation and "
          f"evaluation")


if __name__ == "__main__":
    sys.exit(main())
