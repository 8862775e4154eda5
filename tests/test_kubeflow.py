"""The Kubeflow (KFP v2) compilation is the local DAG, runnable from the project image.

No cluster and no Docker: `solov2 compile-kubeflow` writes the PipelineJob into tmp, the spec
is parsed with kfp-pipeline-spec's protos and compared with the DAG that `create_pipeline`
draws for LocalDagRunner.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from kubeflow import runner
from pipeline import cli, configs
from tests.conftest import REPO_ROOT

IMAGE = "example.com/solov2:test"
PIPELINE_ROOT = "gs://example-bucket/solov2/root"
COCO_DIR = "gs://example-bucket/coco2017"
PROJECT, REGION = "example-project", "us-central1"
# KubeflowV2DagRunner splits a latest-blessed-model Resolver into two tasks (step_builder.py).
BLESSING_RESOLVER_SUFFIX = "-model-blessing-resolver"
MODEL_RESOLVER_SUFFIX = "-model-resolver"


@dataclasses.dataclass(frozen=True)
class Compiled:
    job: dict
    spec: pipeline_spec_pb2.PipelineSpec
    deployment: pipeline_spec_pb2.PipelineDeploymentConfig

    def executor(self, task_name: str) -> pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec:
        component = self.spec.root.dag.tasks[task_name].component_ref.name
        return self.deployment.executors[self.spec.components[component].executor_label]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Compiled:
    output = tmp_path_factory.mktemp("kfp") / "pipeline.json"
    argv = ["compile-kubeflow", "--image", IMAGE, "--pipeline-root", PIPELINE_ROOT]
    argv += ["--coco-dir", COCO_DIR, "--project", PROJECT, "--region", REGION]
    assert cli.main([*argv, "--output", str(output)]) == 0
    job = json.loads(output.read_text())
    spec = json_format.ParseDict(job["pipelineSpec"], pipeline_spec_pb2.PipelineSpec())
    deployment = json_format.ParseDict(
        job["pipelineSpec"]["deploymentSpec"], pipeline_spec_pb2.PipelineDeploymentConfig()
    )
    return Compiled(job, spec, deployment)


@pytest.fixture(scope="module")
def local_nodes(tmp_path_factory) -> list:
    """The nodes LocalDagRunner would run, built with the same data and experiment."""
    from tfx import v1 as tfx

    from pipeline.pipeline import DataSpec, create_pipeline

    local = tmp_path_factory.mktemp("local")
    pipeline = create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=str(local / "pipeline_root"),
        data=DataSpec(root=COCO_DIR, split_files=dict(runner.COCO_2017_SPLIT_FILES)),
        serving_dir=str(local / "serving" / configs.PIPELINE_NAME),
        experiment=runner.DEFAULT_EXPERIMENT,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(local / "metadata.sqlite")
        ),
    )
    return [c for c in pipeline.components if not isinstance(c, tfx.components.InfraValidator)]


def _task_names(node) -> list[str]:
    """KFP task names of a local node; the last one is what its consumers depend on."""
    from tfx.dsl.components.common import resolver
    from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import (
        LatestBlessedModelStrategy,
    )

    if isinstance(node, resolver.Resolver) and issubclass(
        node.exec_properties[resolver.RESOLVER_STRATEGY_CLASS], LatestBlessedModelStrategy
    ):
        return [node.id + BLESSING_RESOLVER_SUFFIX, node.id + MODEL_RESOLVER_SUFFIX]
    return [node.id]


def test_tasks_and_dependencies_match_the_local_dag(compiled, local_nodes):
    tasks = compiled.spec.root.dag.tasks
    expected = {name for node in local_nodes for name in _task_names(node)}
    assert set(tasks) == expected
    for node in local_nodes:
        upstream = {_task_names(up)[-1] for up in node.upstream_nodes}
        siblings = set(_task_names(node))
        for name in siblings:
            assert set(tasks[name].dependent_tasks) - siblings == upstream, name


def test_every_entry_point_in_the_spec_imports(compiled):
    """What the pods run: `python -m <module>` commands and `--executor_class_path` classes."""
    from tfx.dsl.components.base.base_executor import BaseExecutor

    containers = [e.container for e in compiled.deployment.executors.values() if e.container.image]
    assert containers
    modules, classes = set(), set()
    for container in containers:
        hooks = [container, container.lifecycle.pre_cache_check]  # the ExampleGen driver
        for command in (list(hook.command) for hook in hooks if hook.command):
            assert command[:2] == ["python", "-m"], command
            modules.add(command[2])
        args = list(container.args)
        classes.add(args[args.index("--executor_class_path") + 1])
    assert "tfx.orchestration.kubeflow.v2.file_based_example_gen.driver" in modules
    for module in modules:
        importlib.import_module(module)
    for path in classes:
        module, _, name = path.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), BaseExecutor), path


def test_every_artifact_type_in_the_spec_imports_in_the_pods(compiled):
    """A pod rebuilds each input and output artifact from its type's schema title, as TFX's
    entrypoint does; a custom type (RunReport's VisualReport) is imported by that title."""
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_entrypoint_utils
    from tfx.types.artifact import Artifact
    from tfx.utils import import_utils

    from components.run_report.component import VisualReport

    type_names = set()
    for component in compiled.spec.components.values():
        for definitions in (
            component.input_definitions.artifacts,
            component.output_definitions.artifacts,
        ):
            for name, definition in definitions.items():
                path = kubeflow_v2_entrypoint_utils._retrieve_class_path(definition.artifact_type)
                artifact_class = import_utils.import_class_by_path(path)
                assert issubclass(artifact_class, Artifact), (name, path)
                type_names.add(artifact_class.TYPE_NAME)
    assert VisualReport.TYPE_NAME in type_names


def test_every_container_runs_the_given_image(compiled):
    for label, executor in compiled.deployment.executors.items():
        kind = executor.WhichOneof("spec")
        assert kind in ("container", "resolver", "importer"), label
        if kind == "container":
            assert executor.container.image == IMAGE, label


def test_pipeline_root_and_beam_args_target_object_storage_and_dataflow(compiled):
    assert compiled.job["runtimeConfig"]["gcsOutputDirectory"] == PIPELINE_ROOT
    assert compiled.spec.default_pipeline_root == PIPELINE_ROOT
    dataflow = {
        "--runner=DataflowRunner",
        f"--project={PROJECT}",
        f"--region={REGION}",
        f"--temp_location={PIPELINE_ROOT}/beam-tmp",
        f"--sdk_container_image={IMAGE}",  # Dataflow workers import the project from the image
    }
    example_gen = compiled.executor("CocoExampleGen").container
    assert dataflow <= set(example_gen.lifecycle.pre_cache_check.args)
    for name in compiled.spec.root.dag.tasks:
        container = compiled.executor(name).container
        if container.image:
            assert dataflow <= set(container.args), name


def test_no_path_of_the_compiling_machine_leaks_into_the_spec(compiled):
    text = json.dumps(compiled.job)
    for local in {REPO_ROOT, os.path.realpath(REPO_ROOT), sys.prefix}:
        assert local not in text
    schema_gen = compiled.spec.root.dag.tasks["ImportSchemaGen"]
    schema_file = schema_gen.inputs.parameters["schema_file"].runtime_value.constant_value
    assert schema_file.string_value == runner.IMAGE_SCHEMA_PATH
    if "Pusher" in compiled.spec.root.dag.tasks:
        pusher = compiled.spec.root.dag.tasks["Pusher"].inputs.parameters["push_destination"]
        destination = json.loads(pusher.runtime_value.constant_value.string_value)
        serving = f"{PIPELINE_ROOT}/serving/{configs.PIPELINE_NAME}"
        assert destination["filesystem"]["base_directory"] == serving


def test_the_dockerfile_installs_the_schema_where_the_spec_reads_it():
    with open(os.path.join(REPO_ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    assert f"test -f {runner.IMAGE_SCHEMA_PATH}" in dockerfile
    assert "TF_USE_LEGACY_KERAS=" not in dockerfile


def test_accelerators_sit_only_on_the_gpu_nodes(compiled):
    with_gpu = {
        name
        for name in compiled.spec.root.dag.tasks
        if compiled.executor(name).container.resources.accelerator.count
    }
    assert with_gpu == set(runner.GPU_NODE_IDS) & set(compiled.spec.root.dag.tasks)


def test_the_trainer_gets_the_gpu(compiled):
    if "Trainer" not in compiled.spec.root.dag.tasks:
        pytest.skip("create_pipeline has no Trainer yet; the GPU request has nothing to sit on")
    resources = compiled.executor("Trainer").container.resources
    assert resources.accelerator.type == runner.DEFAULT_GPU_TYPE
    assert resources.accelerator.count == 1
    assert resources.memory_limit == runner.GPU_NODE_MEMORY_LIMIT_GB


def test_a_yaml_output_is_the_spec_alone_with_its_root(tmp_path):
    import yaml

    output = tmp_path / "spec" / "pipeline.yaml"
    runner.compile_pipeline(
        str(output),
        image=IMAGE,
        pipeline_root=PIPELINE_ROOT,
        coco_dir=COCO_DIR,
        beam_runner="DirectRunner",
        gpu_count=0,
    )
    spec = json_format.ParseDict(
        yaml.safe_load(output.read_text()), pipeline_spec_pb2.PipelineSpec()
    )
    assert spec.default_pipeline_root == PIPELINE_ROOT
    deployment = json_format.MessageToDict(spec.deployment_spec)
    assert "DataflowRunner" not in json.dumps(deployment)
    assert "accelerator" not in json.dumps(deployment)


def test_local_only_nodes_are_refused_with_an_explanation(monkeypatch, tmp_path):
    from tfx import v1 as tfx

    import pipeline.pipeline as pipeline_module

    def with_infra_validator(**kwargs):
        infra = tfx.components.InfraValidator(
            model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
            serving_spec=tfx.proto.ServingSpec(),
        )
        return tfx.dsl.Pipeline(
            pipeline_name=kwargs["pipeline_name"],
            pipeline_root=kwargs["pipeline_root"],
            components=[infra],
        )

    monkeypatch.setattr(pipeline_module, "create_pipeline", with_infra_validator)
    with pytest.raises(ValueError, match="InfraValidator"):
        runner.compile_pipeline(
            str(tmp_path / "p.json"),
            image=IMAGE,
            pipeline_root=PIPELINE_ROOT,
            coco_dir=COCO_DIR,
            beam_runner="DirectRunner",
        )
    assert not (tmp_path / "p.json").exists()


def test_dataflow_without_a_project_is_refused():
    with pytest.raises(ValueError, match="project, region"):
        runner.beam_pipeline_args("DataflowRunner", image=IMAGE, temp_location="gs://b/t")
    with pytest.raises(ValueError, match="unknown Beam runner"):
        runner.beam_pipeline_args("Dataflow", image=IMAGE)
