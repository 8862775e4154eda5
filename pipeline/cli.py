"""The `solov2` command. Subcommands grow with the project: demo-data, run."""

from __future__ import annotations

import argparse
import os
import sys


def _demo_data(args: argparse.Namespace) -> int:
    from pipeline.demo_data import generate_demo_dataset

    marker = os.path.join(args.out_dir, "annotations", "instances_train.json")
    if args.if_missing and os.path.exists(marker):
        print(f"Demo data already in {args.out_dir}")
        return 0
    summary = generate_demo_dataset(args.out_dir, seed=args.seed, scale=args.scale)
    print(f"Wrote the demo dataset to {args.out_dir}: {summary}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.local_runner import dumps, format_summary, run_local

    summary = run_local(
        args.coco_dir,
        args.output_dir,
        experiment=args.config,
        max_reject_fraction=args.max_reject_fraction,
        enable_cache=not args.no_cache,
    )
    print(dumps(summary) if args.json else format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solov2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the synthetic COCO-format demo dataset")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=int, default=1, help="multiply the number of images")
    demo.add_argument("--if-missing", action="store_true", help="do nothing if it exists")
    demo.set_defaults(func=_demo_data)

    run = sub.add_parser("run", help="run the local pipeline (LocalDagRunner, SQLite MLMD)")
    run.add_argument(
        "--coco-dir", required=True, help="COCO directory (annotations/instances_*.json)"
    )
    run.add_argument("--output-dir", default="outputs")
    run.add_argument("--config", default="demo_cpu", help="named experiment (models/config.py)")
    run.add_argument("--max-reject-fraction", type=float, default=0.05)
    run.add_argument("--no-cache", action="store_true")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
