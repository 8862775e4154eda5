"""A whole `solov2 run` killed during the Trainer, then re-run; and the pushed model served.

1. `solov2 run` starts in its own process group. Once the Trainer has recorded a checkpoint,
   the whole group is SIGKILLed: no cleanup code runs, MLMD keeps a Trainer execution that
   never finished, and nothing is pushed.
2. The same run again: every upstream component comes from cache, the Trainer resumes from the
   checkpoint (its `training_summary.json` says from which step), and the evaluator and Pusher
   complete.
3. The pushed model is checked the way TF Serving would be fed:
   - requests built by InfraValidator's own `request_builder.build_requests` from the eval
     split, fed to `serving_default`;
   - TF Serving REST JSON (`{"signature_name": "serving_bytes", "instances": [{"b64": ...}]}`)
     with base64 JPEGs, decoded as TF Serving decodes it, through `serving_bytes`.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from models import preprocess
from models.config import demo_cpu
from models.train import TRAINING_SUMMARY_FILENAME
from pipeline import configs
from pipeline.demo_data import generate_demo_dataset
from pipeline.local_runner import run_local
from pipeline.pipeline import TrainingSpec
from schemas import features

pytestmark = pytest.mark.e2e

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = {
    "CocoExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "ExampleValidator",
    "SoloTargetGen",
}
TRAIN_STEPS = 20
CHECKPOINT_EVERY = 2
# Narrow widths only (as in test_pipeline_e2e), so the run is short on 2 cores.
CUSTOM_CONFIG = {
    "overrides": {
        "model": {
            "fpn_channels": 32,
            "head_channels": 32,
            "kernel_channels": 32,
            "mask_mid_channels": 32,
        },
        "train": {"batch_size": 2},
    },
    "checkpoint_every": CHECKPOINT_EVERY,
    "log_every": 2,
}
RUN_SCRIPT = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def _cli_run(data_dir: str, out_dir: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        RUN_SCRIPT,
        "run",
        "--coco-dir",
        data_dir,
        "--output-dir",
        out_dir,
        "--train-steps",
        str(TRAIN_STEPS),
        "--custom-config",
        json.dumps(CUSTOM_CONFIG),
    ]


def _kill_during_training(data_dir: str, out_dir: str) -> str:
    """Runs `solov2 run` until the Trainer has saved a checkpoint, then SIGKILLs its group."""
    log_path = os.path.join(out_dir, "killed_run.log")
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_states = os.path.join(
        out_dir, "pipeline_root", "Trainer", "_checkpoints", "*", "checkpoint"
    )
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            _cli_run(data_dir, out_dir),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Its own process group: Beam workers die with it.
        )
        deadline = time.monotonic() + 900
        try:
            # The `checkpoint` state file is written after the ckpt-N files are complete.
            while not glob.glob(checkpoint_states):
                if process.poll() is not None:
                    pytest.fail(f"run ended before a checkpoint: {_tail(log_path)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no Trainer checkpoint in 900 s: {_tail(log_path)}")
                time.sleep(0.2)
            assert process.poll() is None, "the run finished before it could be killed"
            os.killpg(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
    return log_path


def _tail(path: str, chars: int = 3000) -> str:
    with open(path) as f:
        return f.read()[-chars:]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data_dir, out_dir = str(root / "demo"), str(root / "out")
    generate_demo_dataset(data_dir, num_train=6, num_val=3)
    _kill_during_training(data_dir, out_dir)
    killed = {
        "pushed_versions": _versions(os.path.join(out_dir, "serving", "solov2")),
        "checkpoints": sorted(
            glob.glob(os.path.join(out_dir, "pipeline_root", "Trainer", "_checkpoints", "*", "*"))
        ),
    }
    summary = run_local(
        data_dir,
        out_dir,
        training=TrainingSpec(train_steps=TRAIN_STEPS, custom_config=CUSTOM_CONFIG),
    )
    return {"killed": killed, "summary": summary, "data_dir": data_dir, "out_dir": out_dir}


def _versions(serving_dir: str) -> list[str]:
    return sorted(os.listdir(serving_dir)) if os.path.isdir(serving_dir) else []


def _component(summary: dict, node: str) -> dict:
    (component,) = [c for c in summary["components"] if c["id"] == node]
    return component


def test_killed_run_pushed_nothing_and_left_a_checkpoint(resumed):
    assert resumed["killed"]["pushed_versions"] == []
    assert any(p.endswith("checkpoint") for p in resumed["killed"]["checkpoints"])


def test_rerun_takes_upstream_from_cache_and_resumes_the_trainer(resumed):
    summary = resumed["summary"]
    states = {c["id"]: c["state"] for c in summary["components"]}
    for node in UPSTREAM:
        assert states[node] == "cached", (node, states)
    assert states["Trainer"] == states["MaskEvaluator"] == states["Pusher"] == "complete"

    (model_run,) = _component(summary, "Trainer")["outputs"]["model_run"]
    with open(os.path.join(model_run, TRAINING_SUMMARY_FILENAME)) as f:
        training = json.load(f)
    assert 0 < training["start_step"] < TRAIN_STEPS
    assert training["start_step"] % CHECKPOINT_EVERY == 0
    assert training["restored_from"].endswith(f"ckpt-{training['start_step']}")
    assert training["final_step"] == TRAIN_STEPS
    assert summary["blessed"] is True
    assert os.path.isfile(os.path.join(summary["pushed_to"], "saved_model.pb"))


# --------------------------------------------------------------------------------------------
# Serving readiness of the pushed model (no Docker or TF Serving binary here)


@pytest.fixture(scope="module")
def pushed(resumed):
    summary = resumed["summary"]
    model = tf.saved_model.load(summary["pushed_to"])
    (examples_uri,) = _component(summary, "CocoExampleGen")["outputs"]["examples"]
    (model_uri,) = _component(summary, "Trainer")["outputs"]["model"]
    return {"model": model, "examples_uri": examples_uri, "model_uri": model_uri}


def _eval_examples(examples_uri: str) -> list[tf.train.Example]:
    files = sorted(glob.glob(os.path.join(examples_uri, "Split-eval", "*")))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in dataset]


def _check_outputs(outputs: dict, image_sizes: list[tuple[int, int]]) -> None:
    """Fixed-size batch-major outputs of docs/CONTRACT.md for the given original sizes."""
    quarter = preprocess.padded_size(demo_cpu().model.image_max_size) // 4
    batch = len(image_sizes)
    masks = outputs["masks"].numpy()
    assert masks.dtype == np.uint8 and masks.shape[0] == batch
    assert masks.shape[2:] == (quarter, quarter)
    k = masks.shape[1]
    assert outputs["scores"].shape == outputs["classes"].shape == (batch, k)
    assert outputs["category_ids"].shape == (batch, k)
    info = outputs["image_info"].numpy()
    assert [tuple(row[:2]) for row in info] == image_sizes
    num = outputs["num_detections"].numpy()
    classes = outputs["classes"].numpy()
    for b in range(batch):
        assert (classes[b, num[b] :] == -1).all()
        assert (classes[b, : num[b]] >= 0).all()


def test_infra_validator_requests_run_through_serving_default(pushed):
    from tfx.components.infra_validator import request_builder
    from tfx.proto import infra_validator_pb2
    from tfx.types import standard_artifacts

    examples = standard_artifacts.Examples()
    examples.uri = pushed["examples_uri"]
    examples.split_names = json.dumps(["train", "eval"])
    model = standard_artifacts.Model()
    model.uri = pushed["model_uri"]
    spec = infra_validator_pb2.RequestSpec(
        tensorflow_serving=infra_validator_pb2.TensorFlowServingRequestSpec(
            signature_names=["serving_default"]
        ),
        split_name="eval",
        num_examples=3,
    )
    requests = request_builder.build_requests(configs.PIPELINE_NAME, model, examples, spec)
    assert len(requests) == 3

    serving_default = pushed["model"].signatures["serving_default"]
    for request in requests:
        assert request.model_spec.signature_name == "serving_default"
        (key,) = request.inputs.keys()
        records = tf.make_ndarray(request.inputs[key])
        outputs = serving_default(**{key: tf.constant(records)})
        example = tf.train.Example.FromString(records[0])
        size = (
            example.features.feature[features.IMAGE_HEIGHT].int64_list.value[0],
            example.features.feature[features.IMAGE_WIDTH].int64_list.value[0],
        )
        _check_outputs(outputs, [size])


def test_rest_json_with_base64_jpegs_runs_through_serving_bytes(pushed):
    eval_examples = _eval_examples(pushed["examples_uri"])
    jpegs = [e.features.feature[features.IMAGE_ENCODED].bytes_list.value[0] for e in eval_examples]
    # The body a client POSTs to /v1/models/solov2:predict (TF Serving REST, row format).
    body = json.dumps(
        {
            "signature_name": "serving_bytes",
            "instances": [{"b64": base64.b64encode(j).decode("ascii")} for j in jpegs],
        }
    )
    # TF Serving's decoding of that body: {"b64": ...} -> the raw bytes of a DT_STRING tensor.
    request = json.loads(body)
    signature = pushed["model"].signatures[request["signature_name"]]
    (input_name,) = signature.structured_input_signature[1].keys()
    images = [base64.b64decode(instance["b64"]) for instance in request["instances"]]
    outputs = signature(**{input_name: tf.constant(images)})

    sizes = [tuple(tf.io.decode_jpeg(j).shape[:2]) for j in jpegs]
    _check_outputs(outputs, sizes)
    # The JSON response TF Serving builds ("predictions": one object per instance) encodes.
    predictions = [
        {name: tensor[b].numpy().tolist() for name, tensor in outputs.items()}
        for b in range(len(images))
    ]
    assert json.loads(json.dumps({"predictions": predictions}))["predictions"][0].keys() == set(
        outputs
    )
    # The same images as tf.Examples through serving_default give the same detections.
    serialized = [e.SerializeToString() for e in eval_examples]
    by_example = pushed["model"].signatures["serving_default"](examples=tf.constant(serialized))
    for name in outputs:
        np.testing.assert_array_equal(outputs[name].numpy(), by_example[name].numpy())
