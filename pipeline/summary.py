"""Reading what a pipeline run did back from ML Metadata (the ml_metadata API directly)."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_metadata as mlmd
from google.protobuf import json_format
from ml_metadata.proto import metadata_store_pb2

from components.run_report import REPORT_HTML_PROPERTY

STATE_NAMES = {
    metadata_store_pb2.Execution.UNKNOWN: "unknown",
    metadata_store_pb2.Execution.NEW: "new",
    metadata_store_pb2.Execution.RUNNING: "running",
    metadata_store_pb2.Execution.COMPLETE: "complete",
    metadata_store_pb2.Execution.FAILED: "failed",
    metadata_store_pb2.Execution.CACHED: "cached",
    metadata_store_pb2.Execution.CANCELED: "canceled",
}


class MetadataError(RuntimeError):
    """The metadata store is missing or unreadable, or holds no matching run."""


def open_store(metadata_path: str) -> mlmd.MetadataStore:
    """Opens an existing SQLite MLMD store read-only (it never creates or migrates one)."""
    if not os.path.isfile(metadata_path):
        raise MetadataError(
            f"No ML Metadata store at {metadata_path}: run the pipeline first (`solov2 run`) "
            "or point --metadata at its metadata.sqlite."
        )
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    try:
        return mlmd.MetadataStore(config)
    except RuntimeError as e:
        # A read-only connection cannot create MLMD's tables, so an empty or foreign file fails
        # here with a long SQL error; keep only its reason.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason.removeprefix("Error when executing query: ").split(" query:", 1)[0]
        raise MetadataError(
            f"{metadata_path} is not an ML Metadata store (empty, or not written by MLMD: "
            f"{reason})."
        ) from e


def state_name(execution: metadata_store_pb2.Execution) -> str:
    return STATE_NAMES.get(execution.last_known_state, "?")


def duration_s(execution: metadata_store_pb2.Execution) -> float:
    return (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0


def property_value(value: metadata_store_pb2.Value) -> Any:
    """A property as a plain Python value (TFX wraps JSON values as a struct `{"__value__": s}`)."""
    kind = value.WhichOneof("value")
    if kind == "struct_value":
        fields = json_format.MessageToDict(value.struct_value)
        if set(fields) == {"__value__"} and isinstance(fields["__value__"], str):
            try:
                return json.loads(fields["__value__"])
            except ValueError:
                return fields["__value__"]
        return fields
    if kind == "proto_value":
        return value.proto_value.type_url
    return getattr(value, kind) if kind else None


def custom_properties(node) -> dict[str, Any]:
    """Custom properties of an artifact or execution, sorted by name."""
    return {k: property_value(node.custom_properties[k]) for k in sorted(node.custom_properties)}


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
        key=lambda c: (c.create_time_since_epoch, c.id),
    )


def output_artifacts(store: mlmd.MetadataStore, execution_id: int) -> dict[str, list]:
    return outputs_by_execution(store, [execution_id]).get(execution_id, {})


def outputs_by_execution(
    store: mlmd.MetadataStore, execution_ids: list[int]
) -> dict[int, dict[str, list[metadata_store_pb2.Artifact]]]:
    """execution id -> output key -> artifacts, in two queries. A cached execution's outputs are
    the artifacts of the execution it reused."""
    events = [
        e
        for e in store.get_events_by_execution_ids(execution_ids)
        if e.type == metadata_store_pb2.Event.OUTPUT
    ]
    by_id = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    out: dict[int, dict[str, list]] = {}
    for event in events:
        outputs = out.setdefault(event.execution_id, {})
        outputs.setdefault(event.path.steps[0].key, []).append(by_id[event.artifact_id])
    return out


def summarize_latest_run(metadata_path: str, pipeline_name: str) -> dict:
    """Components (state, duration, outputs) of the latest run, plus the ingestion report,
    metrics, blessing, push, TensorBoard dir and visual report when the run has them."""
    store = open_store(metadata_path)
    all_runs = runs(store, pipeline_name)
    if not all_runs:
        raise MetadataError(f"No run of pipeline {pipeline_name!r} in {metadata_path}")
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
                "state": state_name(execution),
                "duration_s": duration_s(execution),
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
        _add_model_stage_outputs(summary, node, outputs)
        for artifact in (a for artifacts in outputs.values() for a in artifacts):
            if REPORT_HTML_PROPERTY in artifact.custom_properties:  # RunReport's VisualReport
                properties = artifact.custom_properties
                summary["visual_report"] = properties[REPORT_HTML_PROPERTY].string_value
    return summary


def _add_model_stage_outputs(summary: dict, node: str, outputs: dict) -> None:
    """Evaluation metrics, blessing, push destination and TensorBoard dir, when present."""
    if node == "Trainer" and outputs.get("model_run"):
        summary["tensorboard"] = outputs["model_run"][0].uri
    if node == "MaskEvaluator" and outputs.get("evaluation"):
        evaluation = outputs["evaluation"][0]
        metrics_path = os.path.join(evaluation.uri, "metrics.json")
        with open(metrics_path) as f:
            metrics = json.load(f)
        summary["evaluation"] = {
            "metrics_path": metrics_path,
            "segm": {k: metrics["segm"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
            "box_AP": metrics["bbox"]["AP"],
        }
    if node == "MaskEvaluator" and outputs.get("blessing"):
        blessing = outputs["blessing"][0]
        summary["blessed"] = bool(blessing.custom_properties["blessed"].int_value)
        if "blessing_message" in blessing.custom_properties:
            summary["blessing_message"] = blessing.custom_properties[
                "blessing_message"
            ].string_value
    if node == "Pusher" and outputs.get("pushed_model"):
        pushed = outputs["pushed_model"][0].custom_properties
        if "pushed" in pushed and pushed["pushed"].int_value == 1:
            summary["pushed_to"] = pushed["pushed_destination"].string_value
