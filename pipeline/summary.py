"""Reading what a pipeline run did back from ML Metadata (the ml_metadata API directly)."""

from __future__ import annotations

import json

import ml_metadata as mlmd
from ml_metadata.proto import metadata_store_pb2

STATE_NAMES = {
    metadata_store_pb2.Execution.UNKNOWN: "unknown",
    metadata_store_pb2.Execution.NEW: "new",
    metadata_store_pb2.Execution.RUNNING: "running",
    metadata_store_pb2.Execution.COMPLETE: "complete",
    metadata_store_pb2.Execution.FAILED: "failed",
    metadata_store_pb2.Execution.CACHED: "cached",
    metadata_store_pb2.Execution.CANCELED: "canceled",
}


def open_store(metadata_path: str) -> mlmd.MetadataStore:
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return mlmd.MetadataStore(config)


def node_id_of(store: mlmd.MetadataStore, execution_id: int) -> str:
    for context in store.get_contexts_by_execution(execution_id):
        if context.type == "node":
            return context.name.split(".", 1)[-1]
    return "?"


def runs(store: mlmd.MetadataStore, pipeline_name: str) -> list[metadata_store_pb2.Context]:
    """pipeline_run contexts of this pipeline, oldest first."""
    pipeline_contexts = [
        c for c in store.get_contexts_by_type("pipeline") if c.name == pipeline_name
    ]
    if not pipeline_contexts:
        return []
    run_contexts = store.get_children_contexts_by_context(pipeline_contexts[0].id)
    return sorted(
        (c for c in run_contexts if c.type == "pipeline_run"),
        key=lambda c: c.create_time_since_epoch,
    )


def output_artifacts(store: mlmd.MetadataStore, execution_id: int) -> dict[str, list]:
    events = store.get_events_by_execution_ids([execution_id])
    out: dict[str, list] = {}
    ids = [e.artifact_id for e in events if e.type == metadata_store_pb2.Event.OUTPUT]
    by_id = {a.id: a for a in store.get_artifacts_by_id(ids)}
    for event in events:
        if event.type == metadata_store_pb2.Event.OUTPUT:
            out.setdefault(event.path.steps[0].key, []).append(by_id[event.artifact_id])
    return out


def summarize_latest_run(metadata_path: str, pipeline_name: str) -> dict:
    """Components (state, duration, outputs) of the latest run, plus the ingestion report."""
    store = open_store(metadata_path)
    all_runs = runs(store, pipeline_name)
    if not all_runs:
        raise RuntimeError(f"No run of pipeline {pipeline_name!r} in {metadata_path}")
    run = all_runs[-1]
    executions = sorted(
        store.get_executions_by_context(run.id), key=lambda e: e.create_time_since_epoch
    )
    summary: dict = {"run_id": run.name, "components": []}
    for execution in executions:
        node = node_id_of(store, execution.id)
        outputs = output_artifacts(store, execution.id)
        summary["components"].append(
            {
                "id": node,
                "state": STATE_NAMES.get(execution.last_known_state, "?"),
                "duration_s": (
                    execution.last_update_time_since_epoch - execution.create_time_since_epoch
                )
                / 1000.0,
                "outputs": {k: [a.uri for a in v] for k, v in outputs.items()},
            }
        )
        if node == "CocoExampleGen" and outputs.get("examples"):
            examples = outputs["examples"][0]
            path = examples.custom_properties["ingestion_report"].string_value
            with open(path) as f:
                report = json.load(f)
            summary["ingestion_report"] = {
                "path": path,
                "images": report["images"],
                "annotations": report["annotations"],
                "output_splits": report["output_splits"],
            }
    return summary
