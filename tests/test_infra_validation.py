"""The optional stock InfraValidator (TF Serving in local Docker) behind `--infra-validate`.

No Docker daemon runs here, so these tests check the wiring the LocalDagRunner would execute
(compiled to its IR), the Kubeflow refusal, and the clear error before anything runs. Serving
readiness itself is proven without a server in tests/test_pipeline_resume.py.
"""

from __future__ import annotations

import os

import pytest

from kubeflow import runner as kubeflow_runner
from pipeline import configs
from pipeline.local_runner import SetupError, require_docker, run_local
from pipeline.pipeline import DataSpec, InfraValidationSpec, create_pipeline


def _pipeline(tmp_path, infra_validation):
    from tfx import v1 as tfx

    return create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=str(tmp_path / "root"),
        data=DataSpec(
            root=str(tmp_path / "coco"),
            split_files={"train": "annotations/train.json", "eval": "annotations/val.json"},
        ),
        serving_dir=str(tmp_path / "serving" / configs.SERVING_MODEL_NAME),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(tmp_path / "metadata.sqlite")
        ),
        infra_validation=infra_validation,
    )


def _proto(value, message):
    """A proto exec property as the component stores it (JSON text) -> `message`."""
    from google.protobuf import json_format

    return value if not isinstance(value, str) else json_format.Parse(value, message)


def _by_id(pipeline) -> dict:
    return {component.id: component for component in pipeline.components}


def test_infra_validator_is_left_out_by_default(tmp_path):
    nodes = _by_id(_pipeline(tmp_path, None))
    assert "InfraValidator" not in nodes
    assert "infra_blessing" not in nodes["Pusher"].inputs


def test_infra_validator_serves_the_trained_model_and_gates_the_pusher(tmp_path):
    from tfx.dsl.compiler import compiler
    from tfx.proto import infra_validator_pb2
    from tfx.proto.orchestration import pipeline_pb2

    spec = InfraValidationSpec(serving_image_tag="2.16.1", num_examples=5)
    pipeline = _pipeline(tmp_path, spec)
    nodes = _by_id(pipeline)
    infra = nodes["InfraValidator"]

    serving = _proto(infra.exec_properties["serving_spec"], infra_validator_pb2.ServingSpec())
    assert serving.WhichOneof("serving_platform") == "local_docker"
    assert serving.WhichOneof("serving_binary") == "tensorflow_serving"
    assert list(serving.tensorflow_serving.tags) == ["2.16.1"]
    assert serving.model_name == configs.SERVING_MODEL_NAME
    request = _proto(infra.exec_properties["request_spec"], infra_validator_pb2.RequestSpec())
    assert list(request.tensorflow_serving.signature_names) == ["serving_default"]
    assert (request.split_name, request.num_examples) == ("eval", 5)
    validation = _proto(
        infra.exec_properties["validation_spec"], infra_validator_pb2.ValidationSpec()
    )
    assert (validation.max_loading_time_seconds, validation.num_tries) == (300, 3)

    assert infra.inputs["model"].producer_component_id == "Trainer"
    assert infra.inputs["examples"].producer_component_id == "CocoExampleGen"
    assert nodes["Pusher"].inputs["infra_blessing"].producer_component_id == "InfraValidator"
    assert nodes["Pusher"].inputs["model_blessing"].producer_component_id == "MaskEvaluator"

    # What LocalDagRunner executes: the compiled IR has the node, upstream of the Pusher.
    ir = compiler.Compiler().compile(pipeline)
    compiled = {node.pipeline_node.node_info.id: node.pipeline_node for node in ir.nodes}
    assert "InfraValidator" in compiled["Pusher"].upstream_nodes
    assert ir.execution_mode == pipeline_pb2.Pipeline.SYNC


def test_kubeflow_refuses_the_infra_validator_with_an_explanation(tmp_path):
    pipeline = _pipeline(tmp_path, InfraValidationSpec())
    with pytest.raises(ValueError, match="InfraValidator.*local Docker daemon"):
        kubeflow_runner._reject_local_only_nodes(pipeline)
    kubeflow_runner._reject_local_only_nodes(_pipeline(tmp_path / "plain", None))


def _docker_answers() -> bool:
    try:
        require_docker()
    except SetupError:
        return False
    return True


@pytest.mark.skipif(_docker_answers(), reason="a Docker daemon answers on this machine")
def test_without_docker_the_run_stops_before_anything_runs(tmp_path):
    with pytest.raises(SetupError, match="no Docker daemon answered"):
        run_local(
            str(tmp_path / "coco"), str(tmp_path / "out"), infra_validation=InfraValidationSpec()
        )
    assert not os.path.exists(tmp_path / "out")
