"""`instanas-train <phase> --config <preset|file> --data <path> --out runs/<name>`."""

from __future__ import annotations

import argparse
import sys
import time

from training.phases import DISTRIBUTED, ORDER

PHASES = (*ORDER, "all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instanas-train", description=__doc__)
    parser.add_argument("phase", choices=PHASES, help="the phase to run; 'all' runs every phase in order, resuming")
    parser.add_argument("--config", default=None, help="preset (smoke, cifar10-cpu, cifar10-paper) or JSON file; "
                        "defaults to the run folder's saved config")
    parser.add_argument("--data", required=True, help="data root (train/test archives or folders) or CIFAR pickles")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, bundle")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set pretrain.epochs=10")
    parser.add_argument("--reconfigure", action="store_true",
                        help="accept a config that differs from the run's saved one in a phase already started")
    parser.add_argument("--bundle", default=None, help="export: bundle folder (default <out>/bundle)")
    parser.add_argument("--baseline-bundle", default=None,
                        help="export: the static MobileNetV2 bundle's folder (default <bundle>-mobilenet_v2)")
    parser.add_argument("--report-dir", default=None, help="report: output folder (default <out>/report)")
    parser.add_argument("--bundle-name", default=None, help="export: bundle name (default: the run's name)")
    args = parser.parse_args(argv)

    from training import distributed
    from training.config import apply_overrides, load_config
    from training.context import Context
    from training.rundir import RunDir, RunError

    try:
        if args.config:
            run = RunDir(args.out, load_config(args.config, args.set), reconfigure=args.reconfigure)
        else:  # continue a run with its saved config, overrides applied on top
            run = RunDir(args.out, reconfigure=args.reconfigure)
            if args.set:
                run = RunDir(args.out, apply_overrides(run.config, args.set), reconfigure=args.reconfigure)
        ctx = Context.open(run, args.data)
        phases = ORDER if args.phase == "all" else (args.phase,)
        for phase in phases:
            t0 = time.time()
            if ctx.rank == 0:
                print(f"== {phase} ==", flush=True)
            if ctx.world == 1 or phase in DISTRIBUTED or ctx.rank == 0:
                _run_phase(phase, ctx, args, explicit=args.phase == phase)
            distributed.barrier()  # under torchrun, the other ranks wait for rank 0's single-process phases
            ctx.run.log(phase, status="done", seconds=round(time.time() - t0, 1))
    except (ValueError, FileNotFoundError, RunError) as exc:
        print(f"instanas-train: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_phase(phase: str, ctx, args, explicit: bool) -> None:
    if phase == "baseline":
        from training import baseline

        baseline.run(ctx)
    elif phase == "twins":
        from training import twins

        twins.run(ctx)  # nothing unless twins.resolutions
    elif phase == "multires":
        from training import multires

        multires.run(ctx)  # nothing unless multires.resolutions and multires.epochs
    elif phase == "shared_twins":
        from training import shared_twins

        shared_twins.run(ctx)  # nothing unless shared_twins.epochs and twins.resolutions
    elif phase == "coadapt":
        from training import coadapt

        coadapt.run(ctx)  # nothing unless coadapt.epochs
    elif phase == "pretrain":
        from training import pretrain

        pretrain.run(ctx)
    elif phase == "profile":
        from training import latency

        latency.run(ctx, force=explicit)  # `all` keeps a table measured before
    elif phase == "search":
        from training import search

        search.run(ctx)
    elif phase == "finetune":
        from training import finetune

        finetune.run(ctx)
    elif phase == "route":
        from training import route

        route.run(ctx)  # nothing unless route.enabled
    elif phase == "export":
        from training import export

        export.run(ctx, args.bundle, args.bundle_name, args.baseline_bundle)
    elif phase == "report":
        from training import report

        report.run(ctx, args.bundle, args.baseline_bundle, args.report_dir)


if __name__ == "__main__":
    sys.exit(main())
