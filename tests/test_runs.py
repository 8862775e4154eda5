"""`solov2 runs`: list / show / lineage read back from ML Metadata.

One real local pipeline run (then a fully cached re-run) checks what TFX actually records; a
small hand-written store checks the stages that may not be in the DAG yet (Trainer, evaluator,
Pusher) and the failed / running states.
"""

from __future__ import annotations

import json
import os

import ml_metadata as mlmd
import pytest
from ml_metadata.proto import metadata_store_pb2 as pb

from pipeline import runs
from pipeline.cli import main
from pipeline.summary import MetadataError

# Components the DAG has today; later stages add to it, so tests check inclusion.
CURRENT_COMPONENTS = {
    "CocoExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "ExampleValidator",
    "SoloTargetGen",
}
ANNOTATION_FILES = ("annotations/instances_train.json", "annotations/instances_val.json")


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory):
    """(metadata path, data dir, first summary, second summary): a run, then a cached re-run."""
    # Imported here so the hand-written-store tests below do not pay for importing TFX.
    from pipeline.demo_data import generate_demo_dataset
    from pipeline.local_runner import LocalPaths, run_local

    root = tmp_path_factory.mktemp("runs")
    data_dir = str(root / "demo")
    generate_demo_dataset(data_dir, num_train=6, num_val=3)
    from pipeline.pipeline import TrainingSpec
    from tests.test_pipeline_e2e import TINY

    training = TrainingSpec(train_steps=1, custom_config=TINY)
    first = run_local(data_dir, str(root / "out"), training=training)
    # The first re-run re-evaluates against the now-blessed baseline (see test_pipeline_e2e);
    # the one after it is fully cached.
    run_local(data_dir, str(root / "out"), training=training)
    second = run_local(data_dir, str(root / "out"), training=training)
    return LocalPaths(str(root / "out")).metadata_path, data_dir, first, second


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["runs", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_a_complete_then_a_cached_run(pipeline_runs, capsys):
    metadata, _, first, second = pipeline_runs
    records = runs.list_runs(metadata, "solov2")
    assert len(records) == 3
    records = [records[0], records[-1]]
    assert [r["run_id"] for r in records] == [first["run_id"], second["run_id"]]
    assert [r["state"] for r in records] == ["complete", "cached"]
    assert all(r["num_components"] >= len(CURRENT_COMPONENTS) for r in records)
    assert records[0]["duration_s"] > records[1]["duration_s"] > 0

    code, out, _ = _cli(capsys, "list", "--metadata", metadata)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("RUN ID")
    assert first["run_id"] in lines[1] and " complete " in lines[1]
    assert second["run_id"] in lines[3] and " cached " in lines[3]

    # Store options are accepted before the sub-subcommand too.
    code, out, _ = _cli(capsys, "--metadata", metadata, "list", "--json")
    assert code == 0
    assert [r["state"] for r in json.loads(out)] == ["complete", "complete", "cached"]


def test_show_latest_lists_every_component_cached_with_ingestion_totals(pipeline_runs, capsys):
    metadata, _, first, second = pipeline_runs
    record = runs.show_run(metadata, "solov2", "latest")
    assert record["run_id"] == second["run_id"] and record["state"] == "cached"
    states = {c["id"]: c["state"] for c in record["components"]}
    assert set(states) >= CURRENT_COMPONENTS
    assert {s for n, s in states.items() if "resolver" not in n} == {"cached"}
    # A cached execution stands for the artifacts of the run that wrote them.
    examples = next(c for c in record["components"] if c["id"] == "CocoExampleGen")
    (artifact,) = examples["outputs"]["examples"]
    first_uris = next(c for c in first["components"] if c["id"] == "CocoExampleGen")["outputs"]
    assert artifact["uri"] == first_uris["examples"][0]
    props = artifact["custom_properties"]
    assert (props["images_in"], props["images_written"], props["images_rejected"]) == (9, 9, 0)
    assert record["reports"]["ingestion_report"] == first["ingestion_report"]["path"]

    code, out, _ = _cli(capsys, "show", "latest", "--metadata", metadata)
    assert code == 0
    for component in CURRENT_COMPONENTS:
        line = next(line for line in out.splitlines() if line.strip().startswith(component + " "))
        assert " cached " in line
    assert "images_in=9" in out and "images_written=9" in out and "images_rejected=0" in out
    assert "ingestion report" in out and first["ingestion_report"]["path"] in out
    assert "TensorBoard logs" in out and "visual report" in out

    code, out, _ = _cli(capsys, "show", "latest", "--json", "--metadata", metadata)
    assert json.loads(out)["run_id"] == second["run_id"]


def test_show_by_prefix_and_unknown_or_ambiguous_runs(pipeline_runs, capsys):
    metadata, _, first, second = pipeline_runs
    prefix = first["run_id"][:-3]
    assert not second["run_id"].startswith(prefix)
    assert runs.show_run(metadata, "solov2", prefix)["run_id"] == first["run_id"]
    code, out, _ = _cli(capsys, "show", prefix, "--metadata", metadata)
    assert code == 0 and out.startswith(f"Run {first['run_id']} ") and " complete " in out

    with pytest.raises(MetadataError, match="No run 'no-such-run'"):
        runs.show_run(metadata, "solov2", "no-such-run")
    code, out, err = _cli(capsys, "show", "no-such-run", "--metadata", metadata)
    assert code != 0 and not out
    assert "No run 'no-such-run'" in err and first["run_id"] in err

    common = os.path.commonprefix([first["run_id"], second["run_id"]])
    code, _, err = _cli(capsys, "show", common, "--metadata", metadata)
    assert code != 0 and "ambiguous" in err


def test_lineage_traces_back_to_the_annotation_files(pipeline_runs, capsys):
    metadata, data_dir, _, second = pipeline_runs
    result = runs.lineage(metadata, "solov2", "latest")
    assert result["run_id"] == second["run_id"]
    assert {"CocoExampleGen", "SoloTargetGen"} <= set(result["components"])
    annotation_paths = {os.path.join(data_dir, f) for f in ANNOTATION_FILES}
    traced = {f["path"] for f in result["input_files"] if f["component"] == "CocoExampleGen"}
    assert annotation_paths | {data_dir} <= traced
    # The chain runs from a final artifact to the component that read the input files.
    assert result["chain"][-1]["component"] == "CocoExampleGen"
    assert result["chain"][-1]["type"] == "Examples"
    assert annotation_paths <= {f["path"] for f in result["chain_inputs"]}
    # Cached run: each artifact is attributed to the execution that actually wrote it.
    producer = result["roots"][0]["producer"]
    assert producer["state"] == "complete" and producer["run_id"] != second["run_id"]

    code, out, _ = _cli(capsys, "lineage", "--metadata", metadata)
    assert code == 0
    chain = next(line for line in out.splitlines() if line.startswith("Chain: "))
    assert "(CocoExampleGen) <- " in chain and all(p in chain for p in annotation_paths)
    for component in ("CocoExampleGen", "SoloTargetGen"):
        assert f"-- {component}  (execution " in out

    code, out, _ = _cli(capsys, "lineage", second["run_id"], "--json", "--metadata", metadata)
    assert code == 0 and json.loads(out)["components"] == result["components"]


def test_missing_or_empty_metadata_gives_a_clear_message(tmp_path, capsys):
    missing = str(tmp_path / "nothing" / "metadata.sqlite")
    with pytest.raises(MetadataError, match="No ML Metadata store at"):
        runs.list_runs(missing, "solov2")
    code, out, err = _cli(capsys, "list", "--metadata", missing)
    assert code != 0 and not out and f"No ML Metadata store at {missing}" in err
    assert not os.path.exists(missing)  # read-only: nothing is created

    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    code, out, err = _cli(capsys, "show", "latest", "--metadata", str(empty))
    assert code != 0 and "is not an ML Metadata store" in err and "CREATE TABLE" not in err

    # A real store without runs of this pipeline.
    store_path = str(tmp_path / "fresh.sqlite")
    _writable_store(store_path)
    code, out, _ = _cli(capsys, "list", "--metadata", store_path)
    assert code == 0 and "No runs of pipeline 'solov2'" in out
    code, _, err = _cli(capsys, "lineage", "--metadata", store_path)
    assert code != 0 and "No runs of pipeline 'solov2'" in err


# ---------------------------------------------------------------------------------------------
# A hand-written store shaped like TFX's, with the model stages and non-success states.


def _writable_store(path: str) -> mlmd.MetadataStore:
    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return mlmd.MetadataStore(config)


class _FakeTfxStore:
    """Writes contexts, executions and events the way TFX's launcher does."""

    def __init__(self, path: str, pipeline: str = "solov2"):
        self.store = _writable_store(path)
        self.pipeline = pipeline
        for name in ("pipeline", "pipeline_run", "node"):
            self.store.put_context_type(pb.ContextType(name=name))
        self.types: dict[str, int] = {}
        (self.pipeline_id,) = self.store.put_contexts(
            [pb.Context(type_id=self._context_type("pipeline"), name=pipeline)]
        )
        self.nodes: dict[str, int] = {}

    def _context_type(self, name: str) -> int:
        return self.store.get_context_type(name).id

    def run(self, name: str) -> pb.Context:
        (run_id,) = self.store.put_contexts(
            [pb.Context(type_id=self._context_type("pipeline_run"), name=name)]
        )
        self.store.put_parent_contexts(
            [pb.ParentContext(child_id=run_id, parent_id=self.pipeline_id)]
        )
        return self.store.get_contexts_by_id([run_id])[0]

    def execute(
        self,
        run: pb.Context,
        node: str,
        *,
        inputs: dict[str, pb.Artifact] | None = None,
        outputs: dict[str, tuple[str, dict]] | None = None,
        state=pb.Execution.COMPLETE,
        properties: dict | None = None,
    ) -> dict[str, pb.Artifact]:
        if node not in self.nodes:
            (self.nodes[node],) = self.store.put_contexts(
                [pb.Context(type_id=self._context_type("node"), name=f"{self.pipeline}.{node}")]
            )
        execution = pb.Execution(
            type_id=self._type(pb.ExecutionType, f"fake.{node}"), last_known_state=state
        )
        for key, value in (properties or {}).items():
            execution.custom_properties[key].string_value = value
        pairs = []
        for key, artifact in (inputs or {}).items():
            event = pb.Event(type=pb.Event.INPUT)
            event.path.steps.add().key = key
            pairs.append((artifact, event))
        created: dict[str, pb.Artifact] = {}
        for key, (type_name, props) in (outputs or {}).items():
            artifact = pb.Artifact(
                type_id=self._type(pb.ArtifactType, type_name),
                uri=f"/root/{node}/{key}",
                state=pb.Artifact.LIVE,
            )
            for prop, value in props.items():
                field = {int: "int_value", float: "double_value", str: "string_value"}
                setattr(artifact.custom_properties[prop], field[type(value)], value)
            event = pb.Event(type=pb.Event.OUTPUT)
            event.path.steps.add().key = key
            pairs.append((artifact, event))
            created[key] = artifact
        contexts = self.store.get_contexts_by_id([run.id, self.nodes[node]])
        _, artifact_ids, _ = self.store.put_execution(execution, pairs, contexts)
        out_ids = artifact_ids[len(inputs or {}) :]
        stored = self.store.get_artifacts_by_id(out_ids)
        return {key: a for key, a in zip(created, stored)}

    def _type(self, proto, name: str) -> int:
        if name not in self.types:
            put = (
                self.store.put_artifact_type
                if proto is pb.ArtifactType
                else self.store.put_execution_type
            )
            self.types[name] = put(proto(name=name))
        return self.types[name]


@pytest.fixture()
def fake_store(tmp_path) -> str:
    path = str(tmp_path / "metadata.sqlite")
    fake = _FakeTfxStore(path)

    earlier = fake.run("2029-12-31T00:00:00.000001")
    baseline = fake.execute(earlier, "Trainer", outputs={"model": ("Model", {})})["model"]

    good = fake.run("2030-01-01T00:00:00.000001")
    examples = fake.execute(
        good,
        "CocoExampleGen",
        outputs={"examples": ("Examples", {"images_in": 12, "ingestion_report": "/r.json"})},
        properties={
            "input_base": "/data/coco",
            "input_config": json.dumps(
                {"splits": [{"name": "train", "pattern": "annotations/instances_train.json"}]}
            ),
        },
    )["examples"]
    targets = fake.execute(
        good, "SoloTargetGen", inputs={"examples": examples}, outputs={"targets": ("Examples", {})}
    )["targets"]
    trained = fake.execute(
        good,
        "Trainer",
        inputs={"examples": targets},
        outputs={"model": ("Model", {}), "model_run": ("ModelRun", {})},
    )
    evaluated = fake.execute(
        good,
        "MaskEvaluator",
        inputs={"baseline_model": baseline, "model": trained["model"], "examples": targets},
        outputs={
            "evaluation": ("ModelEvaluation", {"mask_AP": 0.4213}),
            "blessing": ("ModelBlessing", {"blessed": 1}),
        },
    )
    fake.execute(
        good,
        "RunReport",
        inputs={
            "evaluation": evaluated["evaluation"],
            "model_run": trained["model_run"],
            "examples": examples,
        },
        outputs={"report": ("components.VisualReport", {"report_html": "/r/index.html"})},
    )
    fake.execute(
        good,
        "Pusher",
        inputs={"model": trained["model"], "model_blessing": evaluated["blessing"]},
        outputs={
            "pushed_model": (
                "PushedModel",
                {"pushed": 1, "pushed_version": "1893456000", "pushed_destination": "/s/1893"},
            )
        },
    )

    failed = fake.execute(
        fake.run("2030-01-02T00:00:00.000001"),
        "CocoExampleGen",
        state=pb.Execution.FAILED,
    )
    assert not failed
    running = fake.run("2030-01-03T00:00:00.000001")
    fake.execute(running, "CocoExampleGen", state=pb.Execution.CACHED)
    fake.execute(running, "SoloTargetGen", state=pb.Execution.RUNNING)
    return path


def test_model_stages_show_up_when_present(fake_store, capsys):
    records = runs.list_runs(fake_store, "solov2")
    assert [r["state"] for r in records] == ["complete", "complete", "failed", "running"]
    good = records[1]
    assert good["num_components"] == 6
    assert (good["mask_AP"], good["blessed"], good["pushed_version"]) == (
        0.4213,
        True,
        "1893456000",
    )
    code, out, _ = _cli(capsys, "list", "--metadata", fake_store)
    assert code == 0 and "0.4213" in out and "yes" in out and "1893456000" in out

    shown = runs.show_run(fake_store, "solov2", "2030-01-01")
    assert shown["reports"] == {
        "ingestion_report": "/r.json",
        "tensorboard_logdir": "/root/Trainer/model_run",
        "visual_report": "/r/index.html",
    }
    code, out, _ = _cli(capsys, "show", "2030-01-01", "--metadata", fake_store)
    assert "mask AP 0.4213" in out and "pushed 1893456000 -> /s/1893" in out
    assert "tensorboard --logdir /root/Trainer/model_run" in out
    assert "visual report     /r/index.html" in out


def test_lineage_starts_from_the_pushed_model(fake_store, capsys):
    result = runs.lineage(fake_store, "solov2", "2030-01-01")
    assert result["start"]["from"] == "PushedModel"
    assert [(c["type"], c["component"]) for c in result["chain"]] == [
        ("PushedModel", "Pusher"),
        ("ModelBlessing", "MaskEvaluator"),
        ("Model", "Trainer"),
        ("Examples", "SoloTargetGen"),
        ("Examples", "CocoExampleGen"),
    ]
    # The run's own model, not the baseline it was compared against (same length, older).
    model = runs.show_run(fake_store, "solov2", "2030-01-01")["components"][2]
    assert model["id"] == "Trainer"
    assert result["chain"][2]["artifact_id"] == model["outputs"]["model"][0]["id"]
    assert set(result["components"]) == {
        "Pusher",
        "MaskEvaluator",
        "Trainer",
        "SoloTargetGen",
        "CocoExampleGen",
    }
    assert "/data/coco/annotations/instances_train.json" in {
        f["path"] for f in result["chain_inputs"]
    }
    code, out, _ = _cli(capsys, "lineage", "2030-01-01", "--metadata", fake_store)
    assert code == 0
    assert out.splitlines()[1].startswith("PushedModel #")
    assert "(traced above)" in out  # the Model reached through the blessing and directly

    # Any artifact can be the starting point.
    examples_id = result["chain"][-1]["artifact_id"]
    code, out, _ = _cli(capsys, "lineage", "--artifact", str(examples_id), "--metadata", fake_store)
    assert code == 0 and f"upstream from artifact #{examples_id}:" in out
    assert "instances_train.json" in out and "Trainer" not in out
    # A run that output nothing has nothing to trace.
    code, _, err = _cli(capsys, "lineage", "2030-01-03", "--metadata", fake_store)
    assert code != 0 and "recorded no output artifacts" in err
