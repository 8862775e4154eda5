"""The local pipeline end to end: LocalDagRunner, SQLite MLMD, Beam DirectRunner, demo data.

One session-scoped sequence of runs on one pipeline root exercises caching, the blessing gate
in both directions and partial re-execution:

  A: fresh run, blessing threshold 0          -> every component completes, model pushed
  B: the same again                            -> everything cached but MaskEvaluator, Pusher
     and RunReport: the latest-blessed resolver now returns model A as the baseline (there was
     none in A), so the evaluator's inputs changed. This happens once after a first blessing.
  C: the same again                            -> every component cached
  D: blessing threshold 0.99                   -> only MaskEvaluator, Pusher and RunReport
     re-run; no push, and still a report
  E: one more step, base_lr 0.005 (thr. 0.99)  -> Trainer and downstream re-run, upstream cached
"""

from __future__ import annotations

import json
import os
import re

import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_metadata.proto.v0 import anomalies_pb2

from components.run_report import report as run_report
from components.run_report.component import REPORT_HTML_PROPERTY, VisualReport
from pipeline.demo_data import generate_demo_dataset
from pipeline.local_runner import format_summary, run_local
from pipeline.pipeline import TrainingSpec
from pipeline.runs import lineage, show_run

pytestmark = pytest.mark.e2e

UPSTREAM = {
    "CocoExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "ExampleValidator",
    "SoloTargetGen",
}
MODEL_STAGES = {
    "Trainer",
    "latest_blessed_model_resolver",
    "MaskEvaluator",
    "Pusher",
    "RunReport",
}
NUM_EVAL_IMAGES = 3
# A narrow demo model so that the e2e runs stay short on 2 cores (widths only: no geometry).
TINY = {
    "overrides": {
        "model": {
            "fpn_channels": 32,
            "head_channels": 32,
            "kernel_channels": 32,
            "mask_mid_channels": 32,
        },
        "train": {"batch_size": 2},
    },
    "checkpoint_every": 1,
}


def _training(steps: int, min_mask_ap: float, **train_overrides) -> TrainingSpec:
    custom_config = {
        **TINY,
        "overrides": {
            **TINY["overrides"],
            "train": {**TINY["overrides"]["train"], **train_overrides},
        },
    }
    return TrainingSpec(train_steps=steps, custom_config=custom_config, min_mask_ap=min_mask_ap)


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data_dir = str(root / "demo")
    out = str(root / "out")
    generate_demo_dataset(data_dir, num_train=6, num_val=NUM_EVAL_IMAGES)
    runs = {
        "A": run_local(data_dir, out, training=_training(2, 0.0)),
        "B": run_local(data_dir, out, training=_training(2, 0.0)),
        "C": run_local(data_dir, out, training=_training(2, 0.0)),
    }
    versions_before = sorted(os.listdir(os.path.join(out, "serving", "solov2")))
    runs["D"] = run_local(data_dir, out, training=_training(2, 0.99))
    # A recipe override too: it reaches the Trainer only (SoloTargetGen stays cached).
    runs["E"] = run_local(data_dir, out, training=_training(3, 0.99, base_lr=0.005))
    runs["versions_before_D"] = versions_before
    return out, runs


def _states(run: dict) -> dict[str, str]:
    return {c["id"]: c["state"] for c in run["components"]}


def test_fresh_run_completes_every_component_once(e2e):
    _, runs = e2e
    states = _states(runs["A"])
    assert set(states) == UPSTREAM | MODEL_STAGES
    assert len(runs["A"]["components"]) == len(states)  # Each exactly once.
    assert set(states.values()) == {"complete"}
    text = format_summary(runs["A"])
    for needle in (
        "Ingestion report:",
        "Mask AP",
        "Blessed: yes",
        "Pushed model:",
        "TensorBoard",
        "Visual report: " + runs["A"]["visual_report"],
    ):
        assert needle in text


def test_first_rerun_reevaluates_against_the_new_baseline_only(e2e):
    _, runs = e2e
    states = _states(runs["B"])
    for node in UPSTREAM | {"Trainer"}:
        assert states[node] == "cached", node
    assert states["MaskEvaluator"] == states["RunReport"] == "complete"


def test_rerun_with_nothing_changed_is_fully_cached(e2e):
    _, runs = e2e
    assert len({runs[k]["run_id"] for k in "ABC"}) == 3
    states = _states(runs["C"])
    # The resolver is not an execution that can be cached; everything else is.
    assert {s for n, s in states.items() if n != "latest_blessed_model_resolver"} == {"cached"}


def test_failing_threshold_reruns_only_the_gate_and_does_not_push(e2e):
    out, runs = e2e
    states = _states(runs["D"])
    for node in UPSTREAM | {"Trainer"}:
        assert states[node] == "cached", node
    assert states["MaskEvaluator"] == states["Pusher"] == states["RunReport"] == "complete"
    assert runs["D"]["blessed"] is False
    assert "pushed_to" not in runs["D"]
    # No new version appeared in the serving directory.
    versions = sorted(os.listdir(os.path.join(out, "serving", "solov2")))
    assert versions == runs["versions_before_D"] and all(v.isdigit() for v in versions)


def test_changing_a_training_parameter_reruns_trainer_and_downstream_only(e2e):
    _, runs = e2e
    states = _states(runs["E"])
    for node in UPSTREAM:
        assert states[node] == "cached", node
    for node in ("Trainer", "MaskEvaluator", "Pusher", "RunReport"):
        assert states[node] == "complete", node


def test_pushed_layout_is_what_tf_serving_loads(e2e):
    out, runs = e2e
    pushed = runs["A"]["pushed_to"]
    assert os.path.dirname(pushed) == os.path.join(out, "serving", "solov2")
    assert os.path.exists(os.path.join(pushed, "saved_model.pb"))
    assert os.path.isdir(os.path.join(pushed, "variables"))
    loaded = tf.saved_model.load(pushed)
    assert {"serving_default", "serving_bytes"} <= set(loaded.signatures)


def test_each_run_that_evaluates_writes_a_visual_report_recorded_in_mlmd(e2e):
    out, runs = e2e
    figures = {
        run_report.PR_CURVES_FILENAME,
        run_report.CATEGORY_AP_FILENAME,
        run_report.LOSS_CURVES_FILENAME,  # The Trainer's own TensorBoard logs.
        run_report.TRAINING_SCALARS_FILENAME,
    }
    for key in ("A", "D"):  # Blessed and pushed; not blessed.
        record = show_run(os.path.join(out, "metadata.sqlite"), "solov2", runs[key]["run_id"])
        (component,) = [c for c in record["components"] if c["id"] == "RunReport"]
        (artifact,) = component["outputs"]["report"]
        assert artifact["type"] == VisualReport.TYPE_NAME
        index = artifact["custom_properties"][REPORT_HTML_PROPERTY]
        assert index == os.path.join(artifact["uri"], run_report.REPORT_FILENAME)
        assert index == record["reports"]["visual_report"] == runs[key]["visual_report"]
        with open(index) as f:
            sources = re.findall(r'<img src="([^"]+)"', f.read())
        assert figures <= set(sources)
        predictions = [s for s in sources if s.startswith(run_report.PREDICTIONS_DIRNAME + "/")]
        assert len(predictions) == NUM_EVAL_IMAGES
        for source in sources:
            with Image.open(os.path.join(artifact["uri"], source)) as image:
                image.load()
                assert image.format == "PNG" and min(image.size) > 0, source
    assert runs["A"]["visual_report"] != runs["D"]["visual_report"]
    assert runs["C"]["visual_report"] == runs["B"]["visual_report"]  # cached: the same report


def test_evaluation_metrics_are_complete(e2e):
    _, runs = e2e
    evaluation = runs["A"]["evaluation"]
    with open(evaluation["metrics_path"]) as f:
        metrics = json.load(f)
    assert len(metrics["segm"]) == 12 and len(metrics["bbox"]) == 12
    assert all(-1.0 <= v <= 1.0 for v in metrics["segm"].values())


def test_examples_validate_against_the_schema(e2e):
    _, runs = e2e
    validator = next(c for c in runs["A"]["components"] if c["id"] == "ExampleValidator")
    (anomalies_uri,) = validator["outputs"]["anomalies"]
    for split in ("train", "eval"):
        with open(os.path.join(anomalies_uri, f"Split-{split}", "SchemaDiff.pb"), "rb") as f:
            anomalies = anomalies_pb2.Anomalies.FromString(f.read())
        assert not anomalies.anomaly_info, dict(anomalies.anomaly_info)


def test_ingestion_report_is_reachable_from_mlmd(e2e):
    _, runs = e2e
    report = runs["A"]["ingestion_report"]
    with open(report["path"]) as f:
        full = json.load(f)
    assert full["images"] == report["images"] == {"in": 9, "written": 9, "rejected": 0}


def test_lineage_traces_the_pushed_model_to_the_input_files(e2e):
    out, runs = e2e
    traced = lineage(os.path.join(out, "metadata.sqlite"), "solov2", runs["A"]["run_id"])
    text = json.dumps(traced)
    for node in ("Pusher", "MaskEvaluator", "Trainer", "SoloTargetGen", "CocoExampleGen"):
        assert node in text, node
    assert "instances_train.json" in text and "instances_val.json" in text
