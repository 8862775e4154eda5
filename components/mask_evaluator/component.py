"""MaskEvaluator: COCO mask AP of a serving SavedModel on one split -> ModelEvaluation + ModelBlessing.

Stock TFMA has no instance-mask AP, so this component runs the model itself
(`runner.evaluate_saved_model`) and follows the stock Evaluator's output contract, which Pusher
and `LatestBlessedModelStrategy` rely on: an empty `BLESSED` or `NOT_BLESSED` file in the
blessing's uri, and custom properties `blessed` (1/0), `current_model`, `current_model_id`, plus
`baseline_model` and `baseline_model_id` when a baseline was given.

The model is blessed when its mask AP >= `min_mask_ap` and, with a baseline, its mask AP >=
baseline mask AP - `max_regression`. The baseline is evaluated again on the same split here
(rather than trusting an earlier evaluation from MLMD), so both numbers come from the same data
and the same code.
"""

# No `from __future__ import annotations`: @component reads func.__annotations__ as live types.
import json
import os
from typing import Any

import tensorflow as tf
from absl import logging
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts
from tfx.utils import path_utils

from components.mask_evaluator.coco_metrics import STAT_NAMES
from components.mask_evaluator.runner import evaluate_saved_model, load_category_map

METRICS_FILENAME = "metrics.json"
DETECTIONS_FILENAME = "detections.json"
PRECISION_FILENAME = "precision.npz"  # coco_metrics.PrecisionTable.to_npz(), for PR curves.
SUMMARY_FILENAME = "summary.txt"
BLESSED_FILENAME = "BLESSED"  # File names and property keys as the stock Evaluator writes them.
NOT_BLESSED_FILENAME = "NOT_BLESSED"


def _evaluate(model_uri: str, examples, split: str, batch_size: int) -> dict[str, Any]:
    splits = artifact_utils.decode_split_names(examples.split_names)
    if split not in splits:
        raise ValueError(f"split {split!r} is not in the examples' splits {splits}")
    return evaluate_saved_model(
        path_utils.serving_model_path(model_uri),
        os.path.join(examples.path(split=split), "*"),
        load_category_map(examples.uri),
        batch_size=batch_size,
    )


def _metrics_record(result: dict[str, Any], model, split: str) -> dict[str, Any]:
    """The JSON-ready part of a runner result (detections and summary go to their own files)."""
    return {
        "model": model.uri,
        "model_id": model.id,
        "split": split,
        "num_images": result["num_images"],
        "num_annotations": result["num_annotations"],
        "num_detections": result["num_detections"],
        "segm": result["segm"],
        "bbox": result["bbox"],
        "per_category": {
            str(category_id): value for category_id, value in result["per_category"].items()
        },
        "timing": result["timing"],
    }


def _write(path: str, content: str | bytes) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def blessing_decision(
    mask_ap: float, min_mask_ap: float, baseline_mask_ap: float | None, max_regression: float
) -> tuple[bool, str]:
    """(blessed, human-readable reason). AP -1 (no ground truth in the split) never passes."""
    if not mask_ap >= min_mask_ap:
        return False, f"mask AP {mask_ap:.4f} < min_mask_ap {min_mask_ap:.4f}"
    if baseline_mask_ap is None:
        return True, f"mask AP {mask_ap:.4f} >= min_mask_ap {min_mask_ap:.4f}; no baseline"
    floor = baseline_mask_ap - max_regression
    if not mask_ap >= floor:
        return False, (
            f"mask AP {mask_ap:.4f} < baseline mask AP {baseline_mask_ap:.4f} - max_regression "
            f"{max_regression:.4f}"
        )
    return True, (
        f"mask AP {mask_ap:.4f} >= min_mask_ap {min_mask_ap:.4f} and >= baseline mask AP "
        f"{baseline_mask_ap:.4f} - max_regression {max_regression:.4f}"
    )


@component
def MaskEvaluator(  # noqa: N802 - TFX component names are CamelCase.
    examples: InputArtifact[standard_artifacts.Examples],
    model: InputArtifact[standard_artifacts.Model],
    evaluation: OutputArtifact[standard_artifacts.ModelEvaluation],
    blessing: OutputArtifact[standard_artifacts.ModelBlessing],
    baseline_model: InputArtifact[standard_artifacts.Model] = None,
    eval_split: Parameter[str] = "eval",
    min_mask_ap: Parameter[float] = 0.0,
    max_regression: Parameter[float] = 0.01,
    batch_size: Parameter[int] = 8,
) -> None:
    """Evaluates `model` (and `baseline_model`) on `eval_split`; writes evaluation and blessing.

    `evaluation.uri` gets `metrics.json` (12 mask stats, 12 box-from-mask stats, per-category
    mask AP keyed by COCO id with names, counts, timing; the baseline's under `baseline`),
    `detections.json` (COCO results format), `precision.npz` (COCOeval's accumulated mask
    precision `[T, R, K, A, M]` with its axes, `coco_metrics.PrecisionTable`) and `summary.txt`
    (pycocotools' printout).
    """
    result = _evaluate(model.uri, examples, eval_split, batch_size)
    metrics = _metrics_record(result, model, eval_split)
    baseline_result = None
    if baseline_model is not None:
        if baseline_model.id and baseline_model.id == model.id:
            baseline_result = result
        else:
            baseline_result = _evaluate(baseline_model.uri, examples, eval_split, batch_size)
        metrics["baseline"] = _metrics_record(baseline_result, baseline_model, eval_split)

    _write(os.path.join(evaluation.uri, METRICS_FILENAME), json.dumps(metrics, indent=1))
    _write(os.path.join(evaluation.uri, DETECTIONS_FILENAME), json.dumps(result["detections"]))
    _write(os.path.join(evaluation.uri, PRECISION_FILENAME), result["precision"].to_npz())
    _write(os.path.join(evaluation.uri, SUMMARY_FILENAME), result["summary"])
    for name in STAT_NAMES:
        evaluation.set_float_custom_property(f"mask_{name}", result["segm"][name])
        evaluation.set_float_custom_property(f"box_{name}", result["bbox"][name])
    for key in ("num_images", "num_annotations", "num_detections"):
        evaluation.set_int_custom_property(key, result[key])
    evaluation.set_float_custom_property("eval_seconds", result["timing"]["total"])
    evaluation.set_string_custom_property("eval_split", eval_split)

    mask_ap = result["segm"]["AP"]
    baseline_ap = None if baseline_result is None else baseline_result["segm"]["AP"]
    blessed, reason = blessing_decision(mask_ap, min_mask_ap, baseline_ap, max_regression)
    blessing.set_string_custom_property("current_model", model.uri)
    blessing.set_int_custom_property("current_model_id", model.id)
    if baseline_model is not None:
        blessing.set_string_custom_property("baseline_model", baseline_model.uri)
        blessing.set_int_custom_property("baseline_model_id", baseline_model.id)
        blessing.set_float_custom_property("baseline_mask_AP", baseline_ap)
        evaluation.set_float_custom_property("baseline_mask_AP", baseline_ap)
    blessing.set_float_custom_property("mask_AP", mask_ap)
    blessing.set_float_custom_property("min_mask_ap", min_mask_ap)
    blessing.set_float_custom_property("max_regression", max_regression)
    blessing.set_string_custom_property("blessing_message", reason)
    _write(os.path.join(blessing.uri, BLESSED_FILENAME if blessed else NOT_BLESSED_FILENAME), "")
    blessing.set_int_custom_property("blessed", int(blessed))
    logging.info("MaskEvaluator: %s (%s)", "BLESSED" if blessed else "NOT_BLESSED", reason)
