"""RunReport: one HTML page with PNGs per pipeline run, for a person to look at.

Inputs are what the run already produced: the MaskEvaluator's `evaluation` (metrics.json,
precision.npz, detections.json), the Trainer's `model_run` (TensorBoard event files) and the
CocoExampleGen `examples` (the evaluated split, for images and ground truth). It consumes no
blessing, so it runs whether or not the model was blessed. See `report.py` for the page.

The output is a `VisualReport` artifact whose uri holds `index.html` and the PNGs; its custom
property `report_html` is the path of `index.html` (`solov2 runs show` prints it).
"""

# No `from __future__ import annotations`: @component reads func.__annotations__ as live types.
import json
import os
from typing import Any

import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact, standard_artifacts

from components.mask_evaluator.coco_metrics import PrecisionTable
from components.mask_evaluator.component import (
    DETECTIONS_FILENAME,
    METRICS_FILENAME,
    PRECISION_FILENAME,
)
from components.mask_evaluator.runner import load_category_map
from components.run_report import REPORT_HTML_PROPERTY
from components.run_report.report import read_samples, read_scalars, write_report


class VisualReport(artifact.Artifact):
    """A human-readable report: `index.html` plus the PNGs it shows, in the artifact's uri.

    TYPE_NAME is also how a Kubeflow (KFP v2) pod finds this class again: the compiler requires
    a custom type name of the form `<namespace>.<Class>` (`compiler_utils._SCHEMA_TITLE_RE`),
    and the pod imports that name as a class path (`kubeflow_v2_entrypoint_utils`).
    `components.VisualReport` is both; `components/__init__.py` resolves it lazily.
    """

    TYPE_NAME = "components.VisualReport"


def _read(path: str, mode: str = "r") -> Any:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, mode) as f:
        return f.read()


@component
def RunReport(  # noqa: N802 - TFX component names are CamelCase.
    evaluation: InputArtifact[standard_artifacts.ModelEvaluation],
    model_run: InputArtifact[standard_artifacts.ModelRun],
    examples: InputArtifact[standard_artifacts.Examples],
    report: OutputArtifact[VisualReport],
    num_images: Parameter[int] = 8,
    min_score: Parameter[float] = 0.3,
) -> None:
    """Writes `index.html` and its PNGs into `report.uri`; sets `report_html` to its path.

    `num_images` eval images (the first ones of the evaluated split) are drawn with their ground
    truth and their detections scoring at least `min_score`. Missing inputs (no TensorBoard
    logs, an evaluation without precision.npz, no detections) leave a note in their section.
    """
    metrics_text = _read(os.path.join(evaluation.uri, METRICS_FILENAME))
    metrics = json.loads(metrics_text) if metrics_text is not None else None
    precision_bytes = _read(os.path.join(evaluation.uri, PRECISION_FILENAME), "rb")
    detections_text = _read(os.path.join(evaluation.uri, DETECTIONS_FILENAME))
    split = (metrics or {}).get("split", "eval")
    samples = read_samples(
        os.path.join(examples.path(split=split), "*"),
        json.loads(detections_text) if detections_text is not None else [],
        load_category_map(examples.uri),
        num_images=num_images,
        min_score=min_score,
    )
    path = write_report(
        report.uri,
        metrics=metrics,
        precision=None if precision_bytes is None else PrecisionTable.from_npz(precision_bytes),
        scalars=read_scalars(model_run.uri),
        samples=samples,
        min_score=min_score,
        sources={
            "evaluation": evaluation.uri,
            "TensorBoard logs": model_run.uri,
            f"examples (split {split})": examples.uri,
        },
    )
    report.set_string_custom_property(REPORT_HTML_PROPERTY, path)
