"""The `solov2` command. Subcommands grow with the project: demo-data, run, runs, predict."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.demo_data import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    SPLITS,
    dataset_info,
    generate_demo_dataset,
)


def _demo_data(args: argparse.Namespace) -> int:
    if args.if_missing and _demo_data_matches(
        args.out_dir, (args.num_train * args.scale, args.num_val * args.scale), args.seed
    ):
        print(f"Demo data already in {args.out_dir}")
        return 0
    summary = generate_demo_dataset(
        args.out_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        scale=args.scale,
    )
    print(f"Wrote the demo dataset to {args.out_dir}: {summary}")
    return 0


def _demo_data_matches(out_dir: str, counts: tuple[int, int], seed: int) -> bool:
    """Whether `out_dir` holds the demo set this generator writes for `counts` and `seed`:
    same image counts, and the same generator version and seed in each split's COCO `info`."""
    for split, count in zip(SPLITS, counts):
        path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            coco = json.load(f)
        if len(coco["images"]) != count or coco.get("info") != dataset_info(split, seed):
            return False
    return True


def _show_progress_logs() -> None:
    """Prints the project's own INFO logs (training progress) while TFX stays at WARNING."""
    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("models", "components", "pipeline"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def _run(args: argparse.Namespace) -> int:
    import json

    from pipeline.local_runner import SetupError, dumps, format_summary, run_local
    from pipeline.pipeline import InfraValidationSpec, TrainingSpec

    _show_progress_logs()

    training = TrainingSpec(
        train_steps=args.train_steps,
        custom_config=json.loads(args.custom_config) if args.custom_config else {},
        min_mask_ap=args.min_mask_ap,
        max_regression=args.max_regression,
    )
    try:
        summary = run_local(
            args.coco_dir,
            args.output_dir,
            experiment=args.config,
            training=training,
            max_reject_fraction=args.max_reject_fraction,
            enable_cache=not args.no_cache,
            infra_validation=(
                InfraValidationSpec(serving_image_tag=args.serving_image_tag)
                if args.infra_validate
                else None
            ),
        )
    except SetupError as error:
        print(f"solov2 run: {error}", file=sys.stderr)
        return 2
    print(dumps(summary) if args.json else format_summary(summary))
    return 0


def _runs(args: argparse.Namespace) -> int:
    import json

    from pipeline import runs
    from pipeline.summary import MetadataError

    try:
        if args.runs_command == "list":
            result = runs.list_runs(args.metadata, args.pipeline_name)
            if not result and not args.json:
                print(f"No runs of pipeline {args.pipeline_name!r} in {args.metadata}.")
                return 0
            text = runs.format_runs
        elif args.runs_command == "show":
            result = runs.show_run(args.metadata, args.pipeline_name, args.run)
            text = runs.format_show
        else:
            result = runs.lineage(args.metadata, args.pipeline_name, args.run, args.artifact)
            text = runs.format_lineage
    except MetadataError as e:
        print(f"solov2 runs {args.runs_command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, default=str) if args.json else text(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.predict import PredictError, format_summary, predict

    try:
        summary = predict(
            args.inputs,
            args.model,
            args.output_dir,
            score_threshold=args.score_threshold,
            batch_size=args.batch_size,
            annotations_file=args.annotations,
        )
    except PredictError as e:
        print(f"solov2 predict: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def _add_runs_parser(sub) -> None:
    def store_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
        # Accepted before or after the sub-subcommand: only the `runs` level sets defaults, so
        # (argparse.SUPPRESS) a value given before the sub-subcommand is not overwritten.
        def default(value):
            return value if defaults else argparse.SUPPRESS

        parser.add_argument(
            "--metadata",
            default=default("outputs/metadata.sqlite"),
            help="SQLite ML Metadata file (default: outputs/metadata.sqlite)",
        )
        parser.add_argument(
            "--pipeline-name",
            default=default("solov2"),
            help="pipeline name in the store (default: solov2)",
        )
        parser.add_argument(
            "--json", action="store_true", default=default(False), help="print JSON instead of text"
        )

    group = sub.add_parser("runs", help="inspect pipeline runs recorded in ML Metadata")
    store_options(group, defaults=True)
    runs_sub = group.add_subparsers(dest="runs_command", required=True)
    listing = runs_sub.add_parser("list", help="one line per run: state, duration, AP, push")
    show = runs_sub.add_parser("show", help="components, outputs and reports of one run")
    show.add_argument("run", help="run id, `latest`, or an unambiguous prefix of a run id")
    lineage = runs_sub.add_parser(
        "lineage", help="trace a run's pushed model (or last artifacts) back to the input files"
    )
    lineage.add_argument("run", nargs="?", default="latest", help="as for `show` (default: latest)")
    lineage.add_argument("--artifact", type=int, help="start from this artifact id instead")
    for parser in (listing, show, lineage):
        store_options(parser, defaults=False)
    group.set_defaults(func=_runs)


def _compile_kubeflow(args: argparse.Namespace) -> int:
    import json

    from kubeflow.runner import compile_pipeline, describe
    from pipeline.pipeline import TrainingSpec

    options = {
        "experiment": args.experiment,
        "training": TrainingSpec(
            train_steps=args.train_steps, custom_config=json.loads(args.custom_config)
        ),
        "gpu_count": args.gpus,
        "gpu_type": args.gpu_type,
        "beam_runner": args.beam_runner,
        "project": args.project,
        "region": args.region,
        "temp_location": args.temp_location,
        "serving_dir": args.serving_dir,
    }
    if args.split_file:
        options["split_files"] = dict(item.split("=", 1) for item in args.split_file)
    job = compile_pipeline(
        args.output,
        image=args.image,
        pipeline_root=args.pipeline_root,
        coco_dir=args.coco_dir,
        extra_beam_args=args.beam_arg,
        enable_cache=not args.no_cache,
        **{key: value for key, value in options.items() if value is not None},
    )
    print(describe(job))
    print(f"Wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solov2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the synthetic COCO-format demo dataset")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    demo.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    demo.add_argument("--scale", type=int, default=1, help="multiply the number of images")
    demo.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing if this demo set (counts, seed, generator version) is there already",
    )
    demo.set_defaults(func=_demo_data)

    run = sub.add_parser("run", help="run the local pipeline (LocalDagRunner, SQLite MLMD)")
    run.add_argument(
        "--coco-dir", required=True, help="COCO directory (annotations/instances_*.json)"
    )
    run.add_argument("--output-dir", default="outputs")
    run.add_argument("--config", default="demo_cpu", help="named experiment (models/config.py)")
    run.add_argument("--max-reject-fraction", type=float, default=0.05)
    run.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="training steps (default: the recipe's epochs)",
    )
    run.add_argument(
        "--custom-config",
        default=None,
        help='JSON for the Trainer run_fn, e.g. \'{"overrides": {"train": {"batch_size": 4}}}\'',
    )
    run.add_argument("--min-mask-ap", type=float, default=0.0, help="blessing threshold (mask AP)")
    run.add_argument(
        "--max-regression", type=float, default=0.01, help="allowed AP drop vs the blessed baseline"
    )
    run.add_argument(
        "--infra-validate",
        action="store_true",
        help="add the stock InfraValidator: TF Serving in local Docker must load the model and "
        "answer eval-split requests before the Pusher pushes (needs a Docker daemon)",
    )
    run.add_argument(
        "--serving-image-tag",
        default="2.16.1",
        help="tensorflow/serving image tag (with the above)",
    )
    run.add_argument("--no-cache", action="store_true")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(func=_run)

    predict = sub.add_parser(
        "predict", help="run an exported model on images: overlay PNGs and COCO results"
    )
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help=".jpg/.png or folders")
    predict.add_argument(
        "--model",
        required=True,
        help="SavedModel folder, or a Pusher root (serving/solov2) whose highest version is used",
    )
    predict.add_argument("--output-dir", default="predictions")
    predict.add_argument(
        "--score-threshold", type=float, default=0.3, help="drawn detections (results keep all)"
    )
    predict.add_argument("--batch-size", type=int, default=4)
    predict.add_argument(
        "--annotations", help="COCO JSON whose image ids are used (matched by file name)"
    )
    predict.set_defaults(func=_predict)

    kfp = sub.add_parser(
        "compile-kubeflow", help="compile the pipeline for Kubeflow Pipelines v2 (never submits)"
    )
    kfp.add_argument("--image", required=True, help="image built from the Dockerfile")
    kfp.add_argument("--pipeline-root", required=True, help="artifact root, e.g. gs://bucket/root")
    kfp.add_argument("--coco-dir", required=True, help="COCO root on object storage")
    kfp.add_argument("--output", default="pipeline.json", help=".json job or .yaml spec")
    kfp.add_argument(
        "--split-file",
        action="append",
        metavar="SPLIT=PATH",
        help="annotation JSON per split, relative to --coco-dir (default: COCO 2017 train/val)",
    )
    kfp.add_argument("--experiment", help="named experiment (default solov2_r50_fpn_1x)")
    kfp.add_argument("--train-steps", type=int, help="default: the experiment's epochs")
    kfp.add_argument(
        "--custom-config",
        default="{}",
        help='JSON for run_fn, e.g. \'{"strategy": "tpu", "mixed_precision": "mixed_bfloat16"}\'',
    )
    kfp.add_argument("--gpus", type=int, help="GPUs for Trainer and evaluator (default 1)")
    kfp.add_argument("--gpu-type", help="NVIDIA_TESLA_T4 (Vertex, default) or nvidia.com/gpu")
    kfp.add_argument("--beam-runner", help="DataflowRunner (default), DirectRunner, FlinkRunner...")
    kfp.add_argument("--project", help="GCP project (Dataflow)")
    kfp.add_argument("--region", help="GCP region (Dataflow)")
    kfp.add_argument("--temp-location", help="Dataflow temp dir (default <root>/beam-tmp)")
    kfp.add_argument(
        "--beam-arg", action="append", default=[], help="extra Beam option: --beam-arg=--x=y"
    )
    kfp.add_argument("--serving-dir", help="Pusher destination (default <root>/serving/solov2)")
    kfp.add_argument("--no-cache", action="store_true")
    kfp.set_defaults(func=_compile_kubeflow)

    _add_runs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
