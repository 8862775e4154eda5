"""The local pipeline end to end: LocalDagRunner, SQLite MLMD, Beam DirectRunner, demo data."""

from __future__ import annotations

import json
import os

import pytest
from tensorflow_metadata.proto.v0 import anomalies_pb2

from pipeline.demo_data import generate_demo_dataset
from pipeline.local_runner import format_summary, run_local

pytestmark = pytest.mark.e2e

EXPECTED_COMPONENTS = {
    "CocoExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "ExampleValidator",
    "SoloTargetGen",
}


@pytest.fixture(scope="session")
def local_runs(tmp_path_factory):
    """Two runs of the same pipeline on the same data: the second must be fully cached."""
    root = tmp_path_factory.mktemp("e2e")
    data_dir = str(root / "demo")
    generate_demo_dataset(data_dir, num_train=8, num_val=4)
    first = run_local(data_dir, str(root / "out"))
    second = run_local(data_dir, str(root / "out"))
    return first, second


def test_every_component_ran_once_and_completed(local_runs):
    first, _ = local_runs
    states = {c["id"]: c["state"] for c in first["components"]}
    assert set(states) == EXPECTED_COMPONENTS
    assert len(first["components"]) == len(EXPECTED_COMPONENTS)
    assert set(states.values()) == {"complete"}
    text = format_summary(first)
    assert "Ingestion report:" in text and "CocoExampleGen" in text


def test_rerun_with_nothing_changed_is_fully_cached(local_runs):
    first, second = local_runs
    assert second["run_id"] != first["run_id"]
    assert {c["state"] for c in second["components"]} == {"cached"}
    outputs = lambda run: {c["id"]: c["outputs"] for c in run["components"]}  # noqa: E731
    assert outputs(second) == outputs(first)


def test_examples_validate_against_the_schema(local_runs):
    first, _ = local_runs
    validator = next(c for c in first["components"] if c["id"] == "ExampleValidator")
    (anomalies_uri,) = validator["outputs"]["anomalies"]
    for split in ("train", "eval"):
        with open(os.path.join(anomalies_uri, f"Split-{split}", "SchemaDiff.pb"), "rb") as f:
            anomalies = anomalies_pb2.Anomalies.FromString(f.read())
        assert not anomalies.anomaly_info, dict(anomalies.anomaly_info)


def test_ingestion_report_is_reachable_from_mlmd(local_runs):
    first, _ = local_runs
    report = first["ingestion_report"]
    with open(report["path"]) as f:
        full = json.load(f)
    assert full["images"] == report["images"] == {"in": 12, "written": 12, "rejected": 0}
    assert report["output_splits"]["train"]["images"] == 8
