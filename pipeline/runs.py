"""`solov2 runs`: what each pipeline run did, read back from ML Metadata.

Works on any SQLite MLMD store a TFX run wrote, knowing components only through what TFX
records: `pipeline_run` and `node` contexts, execution states, events, and artifact custom
properties. Components are handled by artifact type, so new stages show up once they have run:

  Examples          ingestion totals (`images_in`, ...) and `ingestion_report` (CocoExampleGen)
  ModelRun          the Trainer's TensorBoard log dir (its uri)
  ModelEvaluation   metrics such as `mask_AP`
  VisualReport      RunReport's page (MLMD type `components.VisualReport`); any artifact may
                    carry a `report_html` path to an HTML report
  ModelBlessing     `blessed` (1/0)
  PushedModel       `pushed` (1/0), `pushed_version`, `pushed_destination`

A cached execution records OUTPUT events to the artifacts of the execution it reused, so a fully
cached run still shows (and traces the lineage of) the artifacts it stands for.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import textwrap
from typing import Any

import ml_metadata as mlmd
from ml_metadata.proto import metadata_store_pb2

from components.run_report import REPORT_HTML_PROPERTY
from pipeline.summary import (
    MetadataError,
    custom_properties,
    duration_s,
    node_id_of,
    open_store,
    outputs_by_execution,
    property_value,
    runs,
    state_name,
)

Artifact = metadata_store_pb2.Artifact
Execution = metadata_store_pb2.Execution
Event = metadata_store_pb2.Event
LineageQuery = metadata_store_pb2.LineageSubgraphQueryOptions

# Bookkeeping custom properties that `show` leaves out of its text (the JSON keeps them all).
QUIET_PROPERTIES = frozenset(
    {
        "tfx_version",
        "is_external",
        "input_fingerprint",
        "span",
        "file_format",
        "payload_format",
        "stats_dashboard_link",
        "sample_rate_by_split",
        "ingestion_report",
        REPORT_HTML_PROPERTY,
    }
)
# Execution properties that name files a component read (besides ExampleGen's input_config).
INPUT_FILE_PROPERTIES = ("schema_file", "module_file")
MAX_LINEAGE_HOPS = 100  # MLMD's own upper bound.


# ---------------------------------------------------------------------------------------------
# Loading runs


@dataclasses.dataclass(frozen=True)
class _Run:
    context: metadata_store_pb2.Context
    executions: list[Execution]  # oldest first
    nodes: dict[int, str]  # execution id -> node id
    outputs: dict[int, dict[str, list[Artifact]]]  # execution id -> output key -> artifacts

    @property
    def run_id(self) -> str:
        return self.context.name

    def output_artifacts(self) -> list[Artifact]:
        """Distinct output artifacts in execution order."""
        seen: dict[int, Artifact] = {}
        for execution in self.executions:
            for artifacts in self.outputs.get(execution.id, {}).values():
                for artifact in artifacts:
                    seen.setdefault(artifact.id, artifact)
        return list(seen.values())

    def of_type(self, type_name: str) -> list[Artifact]:
        return [a for a in self.output_artifacts() if a.type == type_name]


def _load_run(store: mlmd.MetadataStore, context: metadata_store_pb2.Context) -> _Run:
    executions = sorted(
        store.get_executions_by_context(context.id),
        key=lambda e: (e.create_time_since_epoch, e.id),
    )
    ids = [e.id for e in executions]
    return _Run(
        context=context,
        executions=executions,
        nodes={e.id: node_id_of(store, e.id) for e in executions},
        outputs=outputs_by_execution(store, ids) if ids else {},
    )


def _all_runs(store: mlmd.MetadataStore, metadata_path: str, pipeline_name: str) -> list:
    contexts = runs(store, pipeline_name)
    if not contexts:
        names = sorted(c.name for c in store.get_contexts_by_type("pipeline"))
        there = f" (pipelines there: {', '.join(names)})" if names else ""
        raise MetadataError(f"No runs of pipeline {pipeline_name!r} in {metadata_path}{there}.")
    return contexts


def resolve_run(
    store: mlmd.MetadataStore, metadata_path: str, pipeline_name: str, ref: str
) -> metadata_store_pb2.Context:
    """The `pipeline_run` context named by `ref`: a run id, `latest`, or an unambiguous prefix."""
    contexts = _all_runs(store, metadata_path, pipeline_name)
    if ref == "latest":
        return contexts[-1]
    exact = [c for c in contexts if c.name == ref]
    matches = exact or [c for c in contexts if c.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise MetadataError(
            f"Run {ref!r} is ambiguous: it matches {', '.join(c.name for c in matches)}."
        )
    known = ", ".join(c.name for c in contexts[-5:])
    raise MetadataError(
        f"No run {ref!r} of pipeline {pipeline_name!r} in {metadata_path}. "
        f"Latest runs: {known} (see `solov2 runs list`)."
    )


# ---------------------------------------------------------------------------------------------
# Records (plain dicts, JSON-ready)


# System nodes that run on every pipeline run and are never cached (they only query MLMD).
_ALWAYS_RUN_TYPES = ("tfx.dsl.components.common.resolver.Resolver",)


def run_state(executions: list[Execution]) -> str:
    """failed > running > cached (every component execution reused) > complete.

    Resolver executions are left out of the cached/complete decision: they query MLMD anew on
    every run by design, so a run whose components were all reused still counts as cached.
    """
    states = {state_name(e) for e in executions}
    component_states = {state_name(e) for e in executions if e.type not in _ALWAYS_RUN_TYPES}
    if not states:
        return "unknown"
    if states & {"failed", "canceled"}:
        return "failed"
    if states & {"new", "running", "unknown", "?"}:
        return "running"
    return "cached" if component_states == {"cached"} else "complete"


def _time(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000.0).isoformat(sep=" ", timespec="seconds")


def artifact_record(artifact: Artifact) -> dict[str, Any]:
    return {
        "id": artifact.id,
        "type": artifact.type,
        "uri": artifact.uri,
        "properties": {k: property_value(v) for k, v in sorted(artifact.properties.items())},
        "custom_properties": custom_properties(artifact),
    }


def _headline(run: _Run) -> dict[str, Any]:
    """mask AP, blessing and push of a run; None where the stage did not run."""
    mask_ap = blessed = pushed = version = destination = None
    for artifact in run.output_artifacts():
        props = artifact.custom_properties
        if artifact.type == "ModelEvaluation" and "mask_AP" in props:
            mask_ap = property_value(props["mask_AP"])
        elif artifact.type == "ModelBlessing" and "blessed" in props:
            blessed = bool(property_value(props["blessed"]))
        elif artifact.type == "PushedModel":
            pushed = bool(property_value(props["pushed"])) if "pushed" in props else None
            if pushed:
                version = (
                    property_value(props["pushed_version"]) if "pushed_version" in props else None
                )
                destination = (
                    property_value(props["pushed_destination"])
                    if "pushed_destination" in props
                    else None
                )
    return {
        "mask_AP": mask_ap,
        "blessed": blessed,
        "pushed": pushed,
        "pushed_version": version,
        "pushed_destination": destination,
    }


def _run_record(run: _Run) -> dict[str, Any]:
    start = run.context.create_time_since_epoch
    end = max((e.last_update_time_since_epoch for e in run.executions), default=start)
    states: dict[str, int] = {}
    for execution in run.executions:
        states[state_name(execution)] = states.get(state_name(execution), 0) + 1
    return {
        "run_id": run.run_id,
        "start": _time(start),
        "duration_s": round((end - start) / 1000.0, 3),
        "state": run_state(run.executions),
        "execution_states": states,
        "num_components": len(set(run.nodes.values())),
        **_headline(run),
    }


def list_runs(metadata_path: str, pipeline_name: str) -> list[dict[str, Any]]:
    """One record per run, oldest first; [] for a store without runs of this pipeline."""
    store = open_store(metadata_path)
    return [_run_record(_load_run(store, c)) for c in runs(store, pipeline_name)]


def _reports(run: _Run) -> dict[str, str | None]:
    ingestion = tensorboard = visual = None
    for artifact in run.output_artifacts():
        props = artifact.custom_properties
        if ingestion is None and "ingestion_report" in props:
            ingestion = property_value(props["ingestion_report"])
        if artifact.type == "ModelRun":
            tensorboard = artifact.uri
        if REPORT_HTML_PROPERTY in props:
            visual = property_value(props[REPORT_HTML_PROPERTY])
    return {
        "ingestion_report": ingestion,
        "tensorboard_logdir": tensorboard,
        "visual_report": visual,
    }


def show_run(metadata_path: str, pipeline_name: str, ref: str = "latest") -> dict[str, Any]:
    """The run record plus each component's state, duration and outputs, and where reports are."""
    store = open_store(metadata_path)
    run = _load_run(store, resolve_run(store, metadata_path, pipeline_name, ref))
    record = _run_record(run)
    record["pipeline_name"] = pipeline_name
    record["metadata"] = metadata_path
    record["components"] = [
        {
            "id": run.nodes[e.id],
            "execution_id": e.id,
            "type": e.type,
            "state": state_name(e),
            "duration_s": duration_s(e),
            "outputs": {
                key: [artifact_record(a) for a in artifacts]
                for key, artifacts in sorted(run.outputs.get(e.id, {}).items())
            },
        }
        for e in run.executions
    ]
    record["reports"] = _reports(run)
    return record


# ---------------------------------------------------------------------------------------------
# Lineage


def _input_files(execution: Execution) -> list[dict[str, Any]]:
    """Files an execution read, from its exec properties (ExampleGen's input_base/input_config,
    ImportSchemaGen's schema_file, a Trainer's module_file)."""
    props = custom_properties(execution)
    files: list[dict[str, Any]] = []
    base = props.get("input_base")
    if isinstance(base, str) and base:
        files.append({"kind": "input_base", "path": base})
        try:
            splits = json.loads(props.get("input_config") or "{}").get("splits", [])
        except (TypeError, ValueError):
            splits = []
        for split in splits:
            files.append(
                {
                    "kind": "input_config",
                    "split": split.get("name", ""),
                    "path": os.path.join(base, split.get("pattern", "")),
                }
            )
    for key in INPUT_FILE_PROPERTIES:
        if isinstance(props.get(key), str) and props[key]:
            files.append({"kind": key, "path": props[key]})
    return files


class _Graph:
    """An UPSTREAM lineage subgraph, indexed."""

    def __init__(self, graph: metadata_store_pb2.LineageGraph):
        self.artifacts = {a.id: a for a in graph.artifacts}
        self.executions = {e.id: e for e in graph.executions}
        contexts = {c.id: c for c in graph.contexts}
        self.node: dict[int, str] = {}
        self.run: dict[int, str] = {}
        for assoc in graph.associations:
            context = contexts.get(assoc.context_id)
            if context is None:
                continue
            if context.type == "node":
                self.node[assoc.execution_id] = context.name.split(".", 1)[-1]
            elif context.type == "pipeline_run":
                self.run[assoc.execution_id] = context.name
        producers: dict[int, list[int]] = {}
        self.inputs: dict[int, list[tuple[str, int, int]]] = {}
        for event in graph.events:
            if event.execution_id not in self.executions:
                continue
            key = event.path.steps[0].key if event.path.steps else ""
            if event.type == Event.OUTPUT:
                producers.setdefault(event.artifact_id, []).append(event.execution_id)
            elif event.type == Event.INPUT and event.artifact_id in self.artifacts:
                index = event.path.steps[1].index if len(event.path.steps) > 1 else 0
                self.inputs.setdefault(event.execution_id, []).append(
                    (key, index, event.artifact_id)
                )
        for items in self.inputs.values():
            items.sort()
        self.producer = {a: self._original(ids) for a, ids in producers.items()}

    def _original(self, execution_ids: list[int]) -> int:
        """Of the executions that output an artifact, the one that wrote it (not a cache hit)."""
        ids = sorted(set(execution_ids))
        written = [i for i in ids if self.executions[i].last_known_state != Execution.CACHED]
        return (written or ids)[0]


def _lineage_tree(graph: _Graph, artifact_id: int, seen: set[int]) -> dict[str, Any]:
    artifact = graph.artifacts[artifact_id]
    node: dict[str, Any] = {"artifact": artifact_record(artifact)}
    if artifact_id in seen:
        node["seen"] = True
        return node
    seen.add(artifact_id)
    execution_id = graph.producer.get(artifact_id)
    if execution_id is None:
        node["producer"] = None
        return node
    execution = graph.executions[execution_id]
    node["producer"] = {
        "component": graph.node.get(execution_id, "?"),
        "execution_id": execution_id,
        "type": execution.type,
        "state": state_name(execution),
        "run_id": graph.run.get(execution_id),
        "input_files": _input_files(execution),
        "inputs": [
            {"key": key, **_lineage_tree(graph, upstream, seen)}
            for key, _, upstream in graph.inputs.get(execution_id, [])
        ],
    }
    return node


def _chain(graph: _Graph, artifact_ids: list[int]) -> list[int]:
    """The longest artifact path upstream, preferring paths that end at input files, then newer
    artifacts (so a run's own model wins a tie with the baseline it was compared against)."""
    memo: dict[int, tuple[bool, int, list[int]]] = {}

    def best(artifact_id: int) -> tuple[bool, int, list[int]]:
        if artifact_id not in memo:
            execution_id = graph.producer.get(artifact_id)
            ends_at_files = execution_id is not None and bool(
                _input_files(graph.executions[execution_id])
            )
            key, path = (ends_at_files, 1, 0), [artifact_id]
            for _, _, upstream in graph.inputs.get(execution_id, []):
                files, length, upstream_path = best(upstream)
                if (files, length + 1, upstream) > key:
                    key, path = (files, length + 1, upstream), [artifact_id, *upstream_path]
            memo[artifact_id] = (key[0], key[1], path)
        return memo[artifact_id]

    if not artifact_ids:
        return []
    return best(max(artifact_ids, key=lambda a: (*best(a)[:2], a)))[2]


def _starting_artifacts(store: mlmd.MetadataStore, run: _Run) -> tuple[str, list[int]]:
    """The run's pushed model, else its latest Model, else every artifact it output that no
    execution of the run consumed (so each branch of a DAG without a model is traced)."""
    for type_name in ("PushedModel", "Model"):
        found = run.of_type(type_name)
        if found:
            return type_name, [max(a.id for a in found)]
    ids = [e.id for e in run.executions]
    consumed = {
        e.artifact_id
        for e in (store.get_events_by_execution_ids(ids) if ids else [])
        if e.type == Event.INPUT
    }
    return "terminal artifacts", [a.id for a in run.output_artifacts() if a.id not in consumed]


def lineage(
    metadata_path: str,
    pipeline_name: str,
    ref: str = "latest",
    artifact_id: int | None = None,
) -> dict[str, Any]:
    """Traces a run's final artifacts (or `artifact_id`) upstream to the files it read.

    Returns `{"run_id", "start", "roots": [tree], "chain": [...], "components": [...],
    "input_files": [...]}`. A tree node is `{"artifact", "producer": {"component",
    "execution_id", "state", "run_id", "input_files", "inputs": [{"key", ...node}]}}`; an artifact
    already shown higher up is `{"artifact", "seen": True}`.
    """
    store = open_store(metadata_path)
    run = _load_run(store, resolve_run(store, metadata_path, pipeline_name, ref))
    if artifact_id is not None:
        if not store.get_artifacts_by_id([artifact_id]):
            raise MetadataError(f"No artifact {artifact_id} in {metadata_path}.")
        reason, start_ids = "artifact", [artifact_id]
    else:
        reason, start_ids = _starting_artifacts(store, run)
    if not start_ids:
        raise MetadataError(f"Run {run.run_id} recorded no output artifacts to trace.")

    query = LineageQuery(
        starting_artifacts=LineageQuery.StartingNodes(
            filter_query=f"id IN ({', '.join(str(i) for i in start_ids)})"
        ),
        max_num_hops=MAX_LINEAGE_HOPS,
        direction=LineageQuery.UPSTREAM,
    )
    graph = _Graph(
        store.get_lineage_subgraph(
            query, ["artifacts", "executions", "events", "contexts", "associations"]
        )
    )
    seen: set[int] = set()
    roots = [_lineage_tree(graph, a, seen) for a in start_ids]

    components: list[str] = []
    input_files: list[dict[str, Any]] = []

    def collect(node: dict[str, Any]) -> None:
        producer = node.get("producer")
        if not producer:
            return
        if producer["component"] not in components:
            components.append(producer["component"])
        for f in producer["input_files"]:
            input_files.append(
                {"component": producer["component"], "execution_id": producer["execution_id"], **f}
            )
        for upstream in producer["inputs"]:
            collect(upstream)

    for root in roots:
        collect(root)
    chain = []
    for a in _chain(graph, start_ids):
        execution_id = graph.producer.get(a)
        chain.append(
            {
                "artifact_id": a,
                "type": graph.artifacts[a].type,
                "uri": graph.artifacts[a].uri,
                "component": graph.node.get(execution_id) if execution_id else None,
            }
        )
    last = graph.producer.get(chain[-1]["artifact_id"]) if chain else None
    return {
        "run_id": run.run_id,
        "pipeline_name": pipeline_name,
        "start": {"from": reason, "artifact_ids": start_ids},
        "roots": roots,
        "chain": chain,
        "chain_inputs": _input_files(graph.executions[last]) if last else [],
        "components": components,
        "input_files": input_files,
    }


# ---------------------------------------------------------------------------------------------
# Text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def format_runs(records: list[dict[str, Any]]) -> str:
    header = (
        f"{'RUN ID':<28} {'STARTED':<19} {'DURATION':>9}  {'STATE':<9} {'COMPONENTS':>10}  "
        f"{'MASK AP':>7}  {'BLESSED':<7}  PUSHED"
    )
    lines = [header]
    for r in records:
        ap = "-" if r["mask_AP"] is None else _fmt(r["mask_AP"])
        pushed = r["pushed_version"] or _yes_no(r["pushed"])
        lines.append(
            f"{r['run_id']:<28} {r['start']:<19} {r['duration_s']:>7.1f} s  {r['state']:<9} "
            f"{r['num_components']:>10}  {ap:>7}  {_yes_no(r['blessed']):<7}  {pushed}"
        )
    return "\n".join(lines)


def format_show(record: dict[str, Any]) -> str:
    lines = [
        f"Run {record['run_id']} of pipeline {record['pipeline_name']}: {record['state']}, "
        f"started {record['start']}, {record['duration_s']:.1f} s, "
        f"{record['num_components']} components"
    ]
    if (
        record["mask_AP"] is not None
        or record["blessed"] is not None
        or record["pushed"] is not None
    ):
        ap = "-" if record["mask_AP"] is None else _fmt(record["mask_AP"])
        pushed = (
            f"{record['pushed_version']} -> {record['pushed_destination']}"
            if record["pushed"]
            else _yes_no(record["pushed"])
        )
        lines.append(f"  mask AP {ap}   blessed {_yes_no(record['blessed'])}   pushed {pushed}")
    for c in record["components"]:
        lines.append(
            f"  {c['id']:<22} {c['state']:<9} {c['duration_s']:>7.1f} s   execution {c['execution_id']}"
        )
        for key, artifacts in c["outputs"].items():
            for a in artifacts:
                lines.append(f"      {key}: {a['type']} #{a['id']}  {a['uri']}")
                props = " ".join(
                    f"{k}={_fmt(v)}"
                    for k, v in a["custom_properties"].items()
                    if k not in QUIET_PROPERTIES
                )
                if props:
                    lines.extend(
                        textwrap.wrap(
                            props, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8
                        )
                    )
    reports = record["reports"]
    lines.append("Reports:")
    for label, key, missing in (
        ("ingestion report", "ingestion_report", "none (no artifact with `ingestion_report`)"),
        ("TensorBoard logs", "tensorboard_logdir", "none (no ModelRun artifact: Trainer absent)"),
        ("visual report", "visual_report", "none (no artifact with `report_html`)"),
    ):
        lines.append(f"  {label:<17} {reports[key] or missing}")
    if reports["tensorboard_logdir"]:
        lines.append(f"  view with: tensorboard --logdir {reports['tensorboard_logdir']}")
    return "\n".join(lines)


def _tree_lines(node: dict[str, Any], prefix: str, label: str, out: list[str], run_id: str):
    a = node["artifact"]
    head = f"{label}{a['type']} #{a['id']}  {a['uri']}"
    out.append(head + ("  (traced above)" if node.get("seen") else ""))
    producer = node.get("producer")
    if node.get("seen"):
        return
    if producer is None:
        out.append(f"{prefix}`-- (no producing execution recorded)")
        return
    where = "" if producer["run_id"] in (None, run_id) else f", run {producer['run_id']}"
    out.append(
        f"{prefix}`-- {producer['component']}  (execution {producer['execution_id']}, "
        f"{producer['state']}{where})"
    )
    inner = prefix + "    "
    children: list[tuple[str, Any]] = [("file", f) for f in producer["input_files"]]
    children += [("artifact", i) for i in producer["inputs"]]
    for n, (kind, child) in enumerate(children):
        last = n == len(children) - 1
        branch, extend = ("`-- ", "    ") if last else ("|-- ", "|   ")
        if kind == "file":
            name = child.get("split") or child["kind"]
            out.append(f"{inner}{branch}{name}: {child['path']}")
        else:
            _tree_lines(child, inner + extend, f"{inner}{branch}{child['key']}: ", out, run_id)


def format_lineage(result: dict[str, Any]) -> str:
    ids = ", ".join(f"#{i}" for i in result["start"]["artifact_ids"])
    lines = [
        f"Lineage of run {result['run_id']} (pipeline {result['pipeline_name']}), upstream from "
        f"{result['start']['from']} {ids}:"
    ]
    for root in result["roots"]:
        _tree_lines(root, "", "", lines, result["run_id"])
    links = [f"{c['type']} #{c['artifact_id']} ({c['component'] or '?'})" for c in result["chain"]]
    files = [f["path"] for f in result["chain_inputs"] if f["kind"] != "input_base"]
    if files:
        links.append(" + ".join(files))
    lines.append("Chain: " + " <- ".join(links))
    lines.append("Components: " + ", ".join(result["components"]))
    return "\n".join(lines)
