"""Trainer tests: schedule, optimizer, multi-replica parity, mixed precision, resume, overfitting.

All on `tests.train_utils.tiny_config` (demo_cpu shrunk, 128-pixel pad) and four demo images
that went through CocoExampleGen + TargetMaker, i.e. the Trainer's real input.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tfx.components.trainer.fn_args_utils import FnArgs

from components.solo_targets.transform import TargetSpec, decode_rle_masks
from models import train as train_lib
from models.config import apply_overrides
from models.postprocess import paste_masks
from models.schedule import WarmupDecaySchedule, epoch_boundaries, schedule_from_config
from schemas import features
from tests import train_utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> str:
    return train_utils.shared_training_examples(tmp_path_factory)


def _train_pattern(examples_dir: str) -> str:
    return os.path.join(examples_dir, "Split-train", "*")


def _subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")


# --------------------------------------------------------------------------------------------
# Schedule and optimizer against plain Python references


def mmcv_lr(step, *, lr, total, warmup, ratio, step_epochs, epochs, decay, policy):
    """mmcv 1.x `LrUpdaterHook`: epoch-based StepLr or iteration-based CosineAnnealing, with
    `_get_warmup_lr` linear warmup (`total` a multiple of `epochs` here)."""
    if policy == "step":
        epoch = step // (total // epochs)
        regular = lr * decay ** sum(epoch >= s for s in step_epochs)
    else:
        regular = 0.0 + 0.5 * (lr - 0.0) * (math.cos(math.pi * step / total) + 1)
    if step < warmup:
        return regular * (1 - (1 - step / warmup) * (1 - ratio))
    return regular


@pytest.mark.parametrize(
    "policy,warmup,step_epochs",
    [("step", 50, (9, 11)), ("step", 0, (3,)), ("cosine", 50, ()), ("cosine", 0, ())],
)
def test_schedule_matches_mmcv_reference(policy, warmup, step_epochs):
    train = train_utils.tiny_config(
        base_lr=0.01,
        batch_size=8,
        warmup_iters=warmup,
        warmup_ratio=0.01,
        schedule=policy,
        lr_steps=step_epochs,
        epochs=12,
    ).train
    total = 240
    schedule = schedule_from_config(train, total)
    steps = np.arange(total + 1)
    got = np.array([float(schedule(s)) for s in steps])
    want = [
        mmcv_lr(
            s,
            lr=0.005,  # 0.01 at 16 images, scaled to 8.
            total=total,
            warmup=warmup,
            ratio=0.01,
            step_epochs=step_epochs,
            epochs=12,
            decay=0.1,
            policy=policy,
        )
        for s in steps
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)  # float32
    # Serializable: a Keras round trip gives the same schedule.
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(clone, WarmupDecaySchedule)
    assert clone.get_config() == schedule.get_config()


def test_epoch_boundaries_round_half_up():
    assert epoch_boundaries((9, 11), 12, 1000) == (750, 917)  # 916.67 -> 917
    assert epoch_boundaries((9, 11), 12, 6) == (5, 6)  # 4.5 -> 5, 5.5 -> 6
    assert epoch_boundaries((27, 33), 36, 36) == (27, 33)


def test_torch_sgd_matches_pytorch_update_rule():
    """g += wd * w; b = m * b + g; w -= lr * b, with the lr read from a schedule each step."""
    schedule = WarmupDecaySchedule(0.1, total_steps=4, boundaries=(2,), decay=0.5)
    optimizer = train_lib.TorchSGD(learning_rate=schedule, momentum=0.9, l2=0.01)
    variable = keras.Variable(np.array([1.0, -2.0, 3.0], np.float32))
    rng = np.random.default_rng(0)
    w, buffer = variable.numpy().astype(np.float64), np.zeros(3)
    for step in range(4):
        grad = rng.standard_normal(3).astype(np.float32)
        optimizer.apply([tf.constant(grad)], [variable])
        g = grad + 0.01 * w
        buffer = 0.9 * buffer + g
        w = w - (0.1 if step < 2 else 0.05) * buffer
    np.testing.assert_allclose(variable.numpy(), w, rtol=1e-6)
    assert int(optimizer.iterations.numpy()) == 4
    restored = train_lib.TorchSGD.from_config(optimizer.get_config())
    assert restored.l2 == 0.01 and restored.momentum == 0.9


def test_adamw_option_matches_the_decoupled_update_rule():
    """optimizer="adamw": Adam moments with bias correction, decay `lr * wd * w` applied first."""
    train_config = dataclasses.replace(
        train_lib.get_experiment("demo_cpu").train,
        optimizer="adamw",
        base_lr=0.4,  # 0.1 at batch 4
        weight_decay=0.05,
        warmup_iters=0,
        schedule="cosine",
        lr_steps=(),
    )
    optimizer = train_lib.make_optimizer(train_config, total_steps=1000)
    assert isinstance(optimizer, train_lib.SummedGradientAdamW)
    variable = keras.Variable(np.array([1.0, -2.0, 3.0], np.float32))
    rng = np.random.default_rng(0)
    w, m, v = variable.numpy().astype(np.float64), np.zeros(3), np.zeros(3)
    for step in range(1, 4):
        grad = rng.standard_normal(3).astype(np.float32)
        lr = float(optimizer.learning_rate)  # the schedule's value at this step
        optimizer.apply([tf.constant(grad)], [variable])
        w = w - lr * 0.05 * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad.astype(np.float64) ** 2
        w = w - lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-7)
    np.testing.assert_allclose(variable.numpy(), w, rtol=1e-5)
    with pytest.raises(ValueError, match="optimizer 'adam' not in"):
        dataclasses.replace(train_config, optimizer="adam").validate()


def test_custom_config_overrides_round_trip():
    config = train_utils.tiny_config()
    custom = json.loads(
        json.dumps({"experiment": "demo_cpu", "overrides": train_utils.tiny_overrides(config)})
    )
    assert train_lib.experiment_from_custom_config(custom) == config
    assert train_lib.experiment_from_custom_config(None) == train_lib.get_experiment("demo_cpu")
    with pytest.raises(ValueError, match="overrides keys"):
        train_lib.experiment_from_custom_config({"overrides": {"optimizer": {}}})


def test_trainer_refuses_targets_made_for_another_geometry(tmp_path):
    config = train_lib.get_experiment("demo_cpu")
    report_path = tmp_path / features.SOLO_TARGETS_REPORT_FILENAME
    report_path.write_text(json.dumps({"splits": {"train": {"images": 4}}}))
    train_lib.check_targets_match(str(tmp_path), config)  # No spec recorded: not checked.
    spec = TargetSpec.from_config(config, "train").to_json()
    report_path.write_text(json.dumps({"splits": {"train": {"images": 4, "spec": spec}}}))
    train_lib.check_targets_match(str(tmp_path), config)
    with pytest.raises(ValueError, match="sigma: targets 0.2, Trainer 0.3"):
        train_lib.check_targets_match(
            str(tmp_path), apply_overrides(config, {"model": {"sigma": 0.3}})
        )
    with pytest.raises(
        ValueError,
        match=r"variants: targets \[\[224, False\], .*\], Trainer \[\[256, False\], \[256, True\]\]",
    ):
        train_lib.check_targets_match(
            str(tmp_path), apply_overrides(config, {"train": {"train_short_sides": [256]}})
        )
    # Widths and the recipe do not shape targets.
    train_lib.check_targets_match(
        str(tmp_path),
        apply_overrides(config, {"model": {"fpn_channels": 32}, "train": {"base_lr": 0.1}}),
    )


def test_auto_strategy_on_one_cpu_is_the_default_strategy(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = train_lib.make_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert train_lib.is_chief(strategy)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}}))
    assert train_lib._num_workers() == 2
    with pytest.raises(ValueError, match="strategy"):
        train_lib.make_strategy("horovod")


# --------------------------------------------------------------------------------------------
# Multi-replica parity (logical CPU devices must be configured before TF initialises)

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from models.train import SOLOv2Trainer, make_dataset
    from tests.train_utils import tiny_config

    config = tiny_config(norm_eval=True)  # Global batch 4; frozen BN (official norm_eval).
    batch = next(iter(make_dataset(sys.argv[1], config, 4, seed=0)))
    single = SOLOv2Trainer(config, 10)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    multi = SOLOv2Trainer(config, 10, strategy=strategy)
    multi.model.set_weights(single.model.get_weights())
    initial = single.model.get_weights()
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(batch).batch(4))
    dist_batch = next(iter(dist))

    def update_differences():
        # Compare the updates, not the weights: two float32 reductions in different orders
        # differ by ~1e-6 per gradient element, which is large next to a tiny weight but not
        # next to its update. A gradient summed twice (Keras on top of our all-reduce) would
        # give a ratio of 1.
        diffs, frozen_moved = [], 0.0
        for w0, a, b in zip(initial, single.model.get_weights(), multi.model.get_weights()):
            update_norm = float(np.linalg.norm(a - w0))
            if update_norm == 0.0:
                frozen_moved = max(frozen_moved, float(np.abs(b - w0).max()))
            else:
                diffs.append(float(np.linalg.norm((b - w0) - (a - w0))) / update_norm)
        return diffs, frozen_moved

    steps, update_diffs, frozen_moved = [], [], 0.0
    for _ in range(2):
        a, b = single.train_step(batch), multi.train_step(dist_batch)
        steps.append({k: [float(a[k]), float(b[k])] for k in a})
        diffs, moved = update_differences()
        update_diffs.append(diffs)
        frozen_moved = max(frozen_moved, moved)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "steps": steps,
        "max_relative_update_diff": [max(d) for d in update_diffs],
        "median_relative_update_diff": [float(np.median(d)) for d in update_diffs],
        "frozen_weights_moved": frozen_moved,
        "iterations": [int(t.optimizer.iterations.numpy()) for t in (single, multi)],
    }))
    """
)


def test_mirrored_two_replicas_match_single_device(examples_dir):
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, _train_pattern(examples_dir)],
        cwd=REPO_ROOT,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    # Step 1 starts from identical weights: the losses agree to float32 reduction noise. The
    # gradient norm sums every gradient element (seen 5.4e-5 apart once), and step 2 starts from
    # weights that already differ by that noise, so those get 1e-4; a lost or doubled replica
    # would be off by tens of percent.
    for index, step in enumerate(report["steps"]):
        for key in ("category_loss", "mask_loss", "total_loss", "num_positives", "grad_norm"):
            single, multi = step[key]
            tight = index == 0 and key != "grad_norm"
            assert multi == pytest.approx(single, rel=1e-5 if tight else 1e-4), (key, step)
    # Gradients are summed once (not once more by Keras) and clipped on the global gradient.
    # After step 1 (the same weights in both) only the order of float32 reductions differs.
    # Step 2 starts from weights that differ by that noise, and its gradient (norm ~10x step
    # 1's, clipped) amplifies it for a few weights: max 6e-6 to 1.6e-2 from run to run, median
    # ~1e-6. Every bound stays far below the 1.0 of a doubled gradient or the 0.5 of a missing
    # replica.
    first, second = report["max_relative_update_diff"]
    assert first < 1e-3 and second < 1e-1
    assert max(report["median_relative_update_diff"]) < 1e-4
    assert report["frozen_weights_moved"] == 0.0
    assert report["iterations"] == [2, 2]


# --------------------------------------------------------------------------------------------
# Mixed precision


def test_train_step_is_traced_once_whatever_the_instance_count(examples_dir):
    """Batches pad instances to the batch's largest count; the distributed step must not be
    retraced for each count (each trace of the demo model costs about 10 s)."""
    config = train_utils.tiny_config(batch_size=1)
    trainer = train_lib.SOLOv2Trainer(config, 10, max_positives=64)
    dataset = trainer.distribute(
        lambda ctx, batch: train_lib.make_dataset(
            _train_pattern(examples_dir), config, batch, input_context=ctx, seed=0
        )
    )
    iterator = iter(dataset)
    counts = set()
    for _ in range(6):
        batch = next(iterator)
        counts.add(int(batch["instance_masks"].shape[1]))
        metrics = trainer.train_step(batch)
        assert np.isfinite(metrics["total_loss"].numpy())
    assert len(counts) >= 2, counts  # The demo images hold different numbers of instances.
    assert trainer.traces == 1


def test_static_loss_buffer_takes_the_same_step_as_the_trimmed_one(examples_dir):
    """The TPU path (a static positive buffer) and the default (cut to the batch's positives)."""
    config = train_utils.tiny_config(batch_size=2)
    batch = next(iter(train_lib.make_dataset(_train_pattern(examples_dir), config, 2, seed=0)))
    steps = {}
    for static in (False, True):
        keras.utils.set_random_seed(0)
        trainer = train_lib.SOLOv2Trainer(config, 10, max_positives=256, static_shapes=static)
        assert trainer.static_shapes is static
        metrics = trainer.train_step(batch)
        steps[static] = (metrics, [v.numpy() for v in trainer.model.trainable_variables])
    (trimmed, trimmed_weights), (static, static_weights) = steps[False], steps[True]
    assert 0 < float(trimmed["num_positives"]) < 256
    for key in ("category_loss", "mask_loss", "grad_norm"):
        np.testing.assert_allclose(float(trimmed[key]), float(static[key]), rtol=1e-5)
    for got, want in zip(trimmed_weights, static_weights):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert train_lib.SOLOv2Trainer(config, 10).static_shapes is False  # Default strategy: trim.


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step(examples_dir, policy):
    config = train_utils.tiny_config(batch_size=1)  # float16 convolutions are slow on CPU.
    keras.utils.set_random_seed(0)
    trainer = train_lib.SOLOv2Trainer(config, 10, mixed_precision=policy, max_positives=64)
    assert keras.config.dtype_policy().name == "float32"  # Restored after building.
    assert trainer.model.dtype_policy.name == policy
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    iterator = iter(train_lib.make_dataset(_train_pattern(examples_dir), config, 1, seed=0))
    watched = trainer.model.trainable_variables[:3]

    def weights():
        return [v.numpy() for v in watched]

    if policy == "mixed_float16":
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
        assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0**15  # Keras' default.
        # A loss scale of 2^40 overflows float16 gradients for certain: the step must be skipped
        # (weights untouched) and the scale halved, with the losses themselves still finite.
        trainer.optimizer.dynamic_scale.assign(2.0**40)
        before = weights()
        metrics = trainer.train_step(next(iterator))
        assert not np.isfinite(metrics["grad_norm"].numpy())
        assert np.isfinite(metrics["total_loss"].numpy())
        assert metrics["loss_scale"].numpy() == 2.0**40
        assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0**39
        assert all(np.array_equal(b, a) for b, a in zip(before, weights()))
        trainer.optimizer.dynamic_scale.assign(2.0**10)
    # A random initialisation can still overflow at a moderate scale; the optimizer halves it each
    # time, so within a few steps one is applied.
    for _ in range(6):
        before = weights()
        metrics = trainer.train_step(next(iterator))
        if np.isfinite(metrics["grad_norm"].numpy()):
            break
    for key in ("category_loss", "mask_loss", "total_loss", "grad_norm"):
        assert metrics[key].dtype == tf.float32
        assert np.isfinite(metrics[key].numpy()), key
    assert metrics["total_loss"].numpy() > 0
    assert any(not np.array_equal(b, a) for b, a in zip(before, weights()))
    exported = trainer.float32_model()
    assert exported.dtype_policy.name == "float32"
    np.testing.assert_array_equal(exported.get_weights()[0], trainer.model.get_weights()[0])


# --------------------------------------------------------------------------------------------
# run_fn: killed, re-run, resumed

RUN_FN_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    from models.train import run_fn
    run_fn(types.SimpleNamespace(**json.loads(sys.argv[1])))
    """
)
RESUME_TOTAL_STEPS = 12
RESUME_CHECKPOINT_EVERY = 3


def test_killed_run_fn_resumes_from_checkpoint(examples_dir, tmp_path):
    config = train_utils.tiny_config()
    checkpoint_dir = str(tmp_path / "checkpoints")
    fn_args = {
        "train_files": [_train_pattern(examples_dir)],
        "eval_files": [os.path.join(examples_dir, "Split-eval", "*")],
        "train_steps": RESUME_TOTAL_STEPS,
        "model_run_dir": str(tmp_path / "model_run"),
        "serving_model_dir": str(tmp_path / "model" / "Format-Serving"),
        "custom_config": {
            "experiment": "demo_cpu",
            "overrides": train_utils.tiny_overrides(config),
            "strategy": "default",
            "checkpoint_every": RESUME_CHECKPOINT_EVERY,
            "log_every": 3,
            "checkpoint_dir": checkpoint_dir,
            "seed": 0,
        },
    }
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_FN_SCRIPT, json.dumps(fn_args)],
        cwd=REPO_ROOT,
        env=_subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 400
    try:
        # run_fn keys a subfolder by its inputs and config (models.train.keyed_checkpoint_dir).
        # CheckpointManager writes the `checkpoint` state file last, after the ckpt-N files are
        # complete; waiting for the index file alone can kill the run before the save is recorded.
        while not glob.glob(os.path.join(checkpoint_dir, "*", "checkpoint")):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.1)
        assert process.poll() is None, "training finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert not os.path.exists(fn_args["serving_model_dir"])

    result = train_lib.run_fn(FnArgs(**fn_args))
    assert 0 < result["start_step"] < RESUME_TOTAL_STEPS
    assert result["start_step"] % RESUME_CHECKPOINT_EVERY == 0
    assert result["restored_from"].endswith(f"ckpt-{result['start_step']}")
    with open(os.path.join(fn_args["model_run_dir"], train_lib.TRAINING_SUMMARY_FILENAME)) as f:
        assert json.load(f)["start_step"] == result["start_step"]
    assert result["final_step"] == RESUME_TOTAL_STEPS
    assert np.isfinite(result["metrics"]["total_loss"])

    # The last checkpoint holds every update: the optimizer's iterations were restored, not reset.
    trainer = train_lib.SOLOv2Trainer(config, RESUME_TOTAL_STEPS)
    (keyed_dir,) = glob.glob(os.path.join(checkpoint_dir, "*"))
    assert keyed_dir == train_lib.keyed_checkpoint_dir(fn_args["custom_config"], FnArgs(**fn_args))
    latest = tf.train.latest_checkpoint(keyed_dir)
    assert latest.endswith(f"ckpt-{RESUME_TOTAL_STEPS}")
    trainer.checkpoint.restore(latest).assert_existing_objects_matched()
    assert int(trainer.step.numpy()) == RESUME_TOTAL_STEPS
    assert int(trainer.optimizer.iterations.numpy()) == RESUME_TOTAL_STEPS

    # Export with the category map of the Examples artifact; TensorBoard scalars.
    serving = fn_args["serving_model_dir"]
    assert os.path.exists(os.path.join(serving, "saved_model.pb"))
    with open(os.path.join(serving, "assets.extra", features.CATEGORY_MAP_FILENAME)) as f:
        embedded = json.load(f)["categories"]
    assert [c["coco_id"] for c in embedded] == [
        c["coco_id"] for c in train_utils.read_category_map(examples_dir)
    ]
    tags = set()
    for path in glob.glob(os.path.join(fn_args["model_run_dir"], "train", "events.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    assert {
        "category_loss",
        "mask_loss",
        "total_loss",
        "learning_rate",
        "images_per_second",
        "num_positives",
    } <= tags


# --------------------------------------------------------------------------------------------
# Learning: overfit four demo images, then detect through the exported SavedModel

# From random init the category loss sits on a plateau for a while, and how long is chaotic: at
# 200 steps the final loss ended above 1.0 for one or two of seeds 1-4, whichever
# normalization kernels ran (Keras's or `models.ops`'s); 300 steps leave room.
OVERFIT_STEPS = 300
MIN_MEDIUM_LARGE_IOU = 0.5
MIN_ALL_IOU = 0.3


def best_match_ious(examples, outputs) -> tuple[np.ndarray, np.ndarray]:
    """Per non-crowd GT instance: best same-class mask IoU over the detections, and its area."""
    ious, areas = [], []
    for i, example in enumerate(examples):
        feature = example.features.feature
        gt_masks = decode_rle_masks(example).astype(bool)
        crowd = np.asarray(feature[features.OBJECT_IS_CROWD].int64_list.value) == 1
        gt_classes = np.asarray(feature[features.OBJECT_CLASS].int64_list.value)
        n = int(outputs["num_detections"][i])
        masks = paste_masks(outputs["masks"][i][:n], outputs["image_info"][i]).numpy()
        classes = outputs["classes"][i][:n].numpy()
        for gt, is_crowd, gt_class in zip(gt_masks, crowd, gt_classes):
            if is_crowd:
                continue
            same = masks[classes == gt_class]
            inter = (same & gt).sum(axis=(1, 2))
            union = (same | gt).sum(axis=(1, 2))
            ious.append(float((inter / np.maximum(union, 1)).max()) if len(same) else 0.0)
            areas.append(int(gt.sum()))
    return np.array(ious), np.array(areas)


@pytest.mark.slow
def test_overfits_four_demo_images(examples_dir, tmp_path):
    # Official recipe semantics (SGD 0.9, coupled wd, warmup, step decay at epoch 11/12, clip
    # 35); lr 0.02 at batch 4 and 30 warmup steps so a random-init model fits in 300 steps.
    config = train_utils.tiny_config(base_lr=0.08, warmup_iters=30, flip_prob=0.0)
    result = train_lib.train(
        config,
        _train_pattern(examples_dir),
        str(tmp_path / "run"),
        str(tmp_path / "serving"),
        OVERFIT_STEPS,
        strategy="default",
        log_every=50,
        checkpoint_every=OVERFIT_STEPS,
        category_map=train_utils.read_category_map(examples_dir),
        max_positives=128,
        seed=1,
    )
    assert result["metrics"]["total_loss"] < 1.0  # From about 3.6 at initialisation.

    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    examples = train_utils.read_split(examples_dir, "train")
    outputs = loaded.signatures["serving_bytes"](
        images=tf.constant(train_utils.encoded_images(examples))
    )
    ious, areas = best_match_ious(examples, outputs)
    medium_large = areas >= 32 * 32  # COCO medium + large, at the original resolution.
    print(
        f"overfit: loss {result['metrics']['total_loss']:.3f}, mean IoU all {ious.mean():.3f} "
        f"({len(ious)}), medium+large {ious[medium_large].mean():.3f} ({medium_large.sum()})"
    )
    assert medium_large.sum() >= 8
    assert ious[medium_large].mean() >= MIN_MEDIUM_LARGE_IOU
    assert ious.mean() >= MIN_ALL_IOU


def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(tmp_path):
    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx2\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx2\n")
    assert train_lib.cpu_has_native_bfloat16(str(with_bf16))
    assert not train_lib.cpu_has_native_bfloat16(str(without))
    assert not train_lib.cpu_has_native_bfloat16(str(tmp_path / "missing"))
    # This host: "auto" follows its own /proc/cpuinfo (no GPU here).
    expected = "mixed_bfloat16" if train_lib.cpu_has_native_bfloat16() else None
    assert train_lib.resolve_mixed_precision("auto") == expected
    for name in (None, "float32"):
        assert train_lib.resolve_mixed_precision(name) is None
    assert train_lib.resolve_mixed_precision("mixed_float16") == "mixed_float16"
    with pytest.raises(ValueError, match="not in"):
        train_lib.resolve_mixed_precision("fp16")
