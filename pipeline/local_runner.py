"""Local runner: LocalDagRunner, SQLite ML Metadata and Beam's DirectRunner.

It only chooses paths and options; the DAG comes from `pipeline.pipeline.create_pipeline`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time

from pipeline import configs
from pipeline.pipeline import DataSpec, InfraValidationSpec, TrainingSpec


class SetupError(Exception):
    """A run that cannot start (no COCO data, no Docker daemon): the CLI prints it, no trace."""


class MissingCocoData(SetupError, FileNotFoundError):
    """No `annotations/instances_*.json` under the given directory."""


@dataclasses.dataclass(frozen=True)
class LocalPaths:
    output_dir: str

    @property
    def pipeline_root(self) -> str:
        return os.path.join(self.output_dir, "pipeline_root")

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.output_dir, "metadata.sqlite")

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.output_dir, "serving", configs.SERVING_MODEL_NAME)


def discover_coco(coco_dir: str) -> DataSpec:
    """Finds the annotation files of a COCO-style directory.

    `annotations/instances_*train*.json` becomes the train split and `instances_*val*.json` the
    eval split. With a single instances file, splits are made by hashing the image id (9:1).
    """
    coco_dir = os.path.abspath(coco_dir)
    files = sorted(glob.glob(os.path.join(coco_dir, "annotations", "instances_*.json")))
    if not files:
        raise MissingCocoData(
            f"No annotations/instances_*.json under {coco_dir}. Expected a COCO directory like "
            "annotations/instances_train2017.json + train2017/ (or run `solov2 demo-data DIR`)."
        )
    rel = [os.path.relpath(f, coco_dir) for f in files]
    train = [r for r in rel if "train" in os.path.basename(r)]
    val = [r for r in rel if "val" in os.path.basename(r)]
    if len(train) == 1 and len(val) == 1:
        return DataSpec(root=coco_dir, split_files={"train": train[0], "eval": val[0]})
    if len(rel) == 1:
        return DataSpec(root=coco_dir, single_file=rel[0])
    raise ValueError(
        f"Ambiguous annotation files in {coco_dir}/annotations: {rel}. Keep one train and one val "
        "file, or a single file to split by image id."
    )


def require_docker() -> None:
    """Raises a clear error unless a Docker daemon answers (InfraValidator's LocalDocker mode)."""
    import docker  # The Docker SDK, installed with tfx.

    try:
        docker.from_env(timeout=10).ping()
    except Exception as error:  # noqa: BLE001 - any failure means the same thing here.
        raise SetupError(
            "--infra-validate runs TF Serving in local Docker, but no Docker daemon answered "
            f"({type(error).__name__}: {error}). Start Docker, or run without --infra-validate "
            "(tests/test_pipeline_resume.py proves serving readiness without a server)."
        ) from error


def run_local(
    coco_dir: str,
    output_dir: str,
    *,
    experiment: str = configs.DEFAULT_EXPERIMENT,
    training: TrainingSpec | None = None,
    beam_pipeline_args: tuple[str, ...] = configs.DEFAULT_BEAM_ARGS,
    max_reject_fraction: float = 0.05,
    enable_cache: bool = True,
    infra_validation: InfraValidationSpec | None = None,
) -> dict:
    """Runs the pipeline locally and returns a summary dict (paths, timings, report).

    `infra_validation` adds the stock InfraValidator (TF Serving in local Docker); it needs a
    running Docker daemon, checked before anything runs (`require_docker`).
    """
    from tfx import v1 as tfx

    from pipeline.pipeline import create_pipeline
    from pipeline.summary import summarize_latest_run

    if infra_validation is not None:
        require_docker()
    paths = LocalPaths(os.path.abspath(output_dir))
    data = discover_coco(coco_dir)
    pipeline = create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=paths.pipeline_root,
        data=data,
        serving_dir=paths.serving_dir,
        experiment=experiment,
        training=training,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            paths.metadata_path
        ),
        beam_pipeline_args=beam_pipeline_args,
        max_reject_fraction=max_reject_fraction,
        enable_cache=enable_cache,
        infra_validation=infra_validation,
    )
    start = time.time()
    tfx.orchestration.LocalDagRunner().run(pipeline)
    summary = summarize_latest_run(paths.metadata_path, configs.PIPELINE_NAME)
    summary["wall_time_s"] = round(time.time() - start, 1)
    summary["paths"] = {
        "output_dir": paths.output_dir,
        "pipeline_root": paths.pipeline_root,
        "metadata": paths.metadata_path,
        "serving_dir": paths.serving_dir,
    }
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"Pipeline run {summary['run_id']}  ({summary['wall_time_s']} s wall time)"]
    for node in summary["components"]:
        lines.append(f"  {node['id']:<22} {node['state']:<9} {node['duration_s']:>7.1f} s")
    report = summary.get("ingestion_report")
    if report:
        lines.append("Ingestion report: " + report["path"])
        for group in ("images", "annotations"):
            c = report[group]
            lines.append(
                f"  {group:<12} in {c['in']:>6}  written {c['written']:>6}  rejected {c['rejected']:>5}"
            )
        for split, c in report["output_splits"].items():
            lines.append(f"  split {split:<7} {c['images']} images, {c['annotations']} annotations")
    evaluation = summary.get("evaluation")
    if evaluation:
        lines.append("Mask AP (COCO, eval split): " + evaluation["metrics_path"])
        lines.append("  " + "  ".join(f"{k}={v:.3f}" for k, v in evaluation["segm"].items()))
        lines.append("  box AP from masks: " + f"{evaluation['box_AP']:.3f}")
    if "blessed" in summary:
        lines.append(
            f"Blessed: {'yes' if summary['blessed'] else 'no'}  ({summary.get('blessing_message', '')})"
        )
    if summary.get("pushed_to"):
        lines.append(f"Pushed model: {summary['pushed_to']}")
    elif "blessed" in summary:
        lines.append("Pushed model: none (not blessed)")
    if summary.get("tensorboard"):
        lines.append(f"TensorBoard logs: {summary['tensorboard']}  (tensorboard --logdir <that>)")
    if summary.get("visual_report"):
        lines.append(f"Visual report: {summary['visual_report']}")
    lines.append("Outputs:")
    for key, value in summary["paths"].items():
        lines.append(f"  {key:<14} {value}")
    return "\n".join(lines)


def dumps(summary: dict) -> str:
    return json.dumps(summary, indent=1, default=str)
