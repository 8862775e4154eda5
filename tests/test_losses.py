"""Losses against plain NumPy references written from the formulas (reference doc section 3)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from models.losses import (
    dice_loss,
    global_positive_counts,
    positive_counts,
    sigmoid_focal_loss,
    solov2_loss,
)

NUM_CELLS, NUM_CLASSES, EMBED, H, W = 20, 3, 4, 6, 8


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_focal(logits, targets, alpha=0.25, gamma=2.0):
    p = _sigmoid(logits)
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    p_t = np.where(targets == 1, p, 1 - p)
    alpha_t = np.where(targets == 1, alpha, 1 - alpha)
    return alpha_t * (1 - p_t) ** gamma * bce


def np_dice(p, q):
    a = (p * q).sum()
    return 1 - 2 * a / ((p * p).sum() + 0.001 + (q * q).sum() + 0.001)


def np_solov2_loss(outputs, targets, num_classes, dice_weight=3.0):
    """Straightforward per-image, per-positive loops over the batch (no truncation)."""
    logits = outputs["category_logits"].astype(np.float64)
    kernels = outputs["kernels"].astype(np.float64)
    feats = outputs["mask_features"].astype(np.float64)
    focal_sum, dices, num_pos = 0.0, [], 0
    for b in range(logits.shape[0]):
        for cell in range(logits.shape[1]):
            cls = targets["cell_class"][b, cell]
            one_hot = np.zeros(num_classes)
            if cls >= 0:
                one_hot[cls] = 1
                num_pos += 1
                mask = _sigmoid(np.einsum("hwe,e->hw", feats[b], kernels[b, cell]))
                target = targets["instance_masks"][b, targets["cell_instance"][b, cell]]
                dices.append(np_dice(mask, target.astype(np.float64)))
            focal_sum += np_focal(logits[b, cell], one_hot).sum()
    category = focal_sum / (num_pos + 1)
    mask = dice_weight * np.mean(dices) if dices else 0.0
    return category, mask


def make_batch(rng, positives_per_image, num_instances=3):
    """Random outputs + targets; image b has positives at the given cells (instance = cell % N)."""
    batch = len(positives_per_image)
    outputs = {
        "category_logits": rng.normal(size=(batch, NUM_CELLS, NUM_CLASSES)).astype(np.float32),
        "kernels": rng.normal(size=(batch, NUM_CELLS, EMBED)).astype(np.float32),
        "mask_features": rng.normal(size=(batch, H, W, EMBED)).astype(np.float32),
    }
    cell_class = -np.ones((batch, NUM_CELLS), np.int32)
    cell_instance = -np.ones((batch, NUM_CELLS), np.int32)
    for b, cells in enumerate(positives_per_image):
        for cell in cells:
            cell_class[b, cell] = rng.integers(NUM_CLASSES)
            cell_instance[b, cell] = cell % num_instances
    targets = {
        "cell_class": cell_class,
        "cell_instance": cell_instance,
        "instance_masks": (rng.random((batch, num_instances, H, W)) > 0.5).astype(np.uint8),
    }
    return outputs, targets


@tf.function
def loss_fn(outputs, targets, max_positives=8):
    return solov2_loss(outputs, targets, num_classes=NUM_CLASSES, max_positives=max_positives)


def test_focal_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4, 7, 5)).astype(np.float32)
    targets = (rng.random((4, 7, 5)) > 0.7).astype(np.float32)
    got = sigmoid_focal_loss(logits, targets, alpha=0.3, gamma=1.5).numpy()
    np.testing.assert_allclose(got, np_focal(logits, targets, 0.3, 1.5), rtol=1e-5, atol=1e-6)


def test_dice_matches_numpy_and_zeroes_invalid():
    rng = np.random.default_rng(1)
    probs = rng.random((2, 3, H, W)).astype(np.float32)
    targets = (rng.random((2, 3, H, W)) > 0.5).astype(np.uint8)
    valid = np.array([[True, False, True], [True, True, False]])
    got = dice_loss(probs, targets, valid).numpy()
    for b in range(2):
        for n in range(3):
            want = np_dice(probs[b, n], targets[b, n]) if valid[b, n] else 0.0
            np.testing.assert_allclose(got[b, n], want, rtol=1e-5, atol=1e-6)
    from_logits = dice_loss(np.log(probs / (1 - probs)), targets, from_logits=True).numpy()
    np.testing.assert_allclose(from_logits[valid], got[valid], rtol=1e-5, atol=1e-6)


def test_empty_ground_truth_gives_zero_mask_loss_and_finite_gradients():
    rng = np.random.default_rng(2)
    outputs, targets = make_batch(rng, [[], []], num_instances=0)
    outputs = {k: tf.Variable(v) for k, v in outputs.items()}
    with tf.GradientTape() as tape:
        parts = loss_fn(outputs, targets)
    grads = tape.gradient(parts["total_loss"], list(outputs.values()))
    assert parts["category_loss"].numpy() > 0
    assert parts["mask_loss"].numpy() == 0.0
    assert parts["num_positives"].numpy() == 0
    want_category, _ = np_solov2_loss({k: v.numpy() for k, v in outputs.items()}, targets, 3)
    np.testing.assert_allclose(parts["category_loss"].numpy(), want_category, rtol=1e-5)
    for grad in grads:
        if grad is not None:
            assert np.all(np.isfinite(grad.numpy()))


def test_one_object_gives_both_losses_positive():
    rng = np.random.default_rng(3)
    outputs, targets = make_batch(rng, [[5, 6, 9], []], num_instances=1)
    parts = loss_fn(outputs, targets)
    assert parts["category_loss"].numpy() > 0
    assert parts["mask_loss"].numpy() > 0
    np.testing.assert_allclose(
        parts["total_loss"].numpy(),
        parts["category_loss"].numpy() + parts["mask_loss"].numpy(),
        rtol=1e-6,
    )


def test_batch_with_different_positive_counts_matches_formula():
    rng = np.random.default_rng(4)
    outputs, targets = make_batch(rng, [[0, 3, 4, 17, 19], [11]])
    parts = loss_fn(outputs, targets)
    want_category, want_mask = np_solov2_loss(outputs, targets, NUM_CLASSES)
    np.testing.assert_allclose(parts["category_loss"].numpy(), want_category, rtol=1e-5)
    np.testing.assert_allclose(parts["mask_loss"].numpy(), want_mask, rtol=1e-5)
    assert parts["num_positives"].numpy() == 6
    assert parts["num_truncated_positives"].numpy() == 0


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_outputs_give_float32_losses(dtype):
    rng = np.random.default_rng(5)
    outputs, targets = make_batch(rng, [[1, 2, 8], [4, 12]])
    low = {k: tf.cast(v, dtype) for k, v in outputs.items()}
    # Reference: the same (rounded) values, computed in float32 from the start.
    rounded = {k: tf.cast(v, tf.float32) for k, v in low.items()}
    got = solov2_loss(low, targets, num_classes=NUM_CLASSES, max_positives=8)
    want = solov2_loss(rounded, targets, num_classes=NUM_CLASSES, max_positives=8)
    for key in ("category_loss", "mask_loss", "total_loss"):
        assert got[key].dtype == tf.float32
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-6)


def test_truncation_keeps_first_positives_in_cell_order():
    rng = np.random.default_rng(6)
    outputs, targets = make_batch(rng, [[2, 7, 9, 13, 18], [0, 1]])
    parts = loss_fn(outputs, targets, max_positives=3)
    assert parts["num_positives"].numpy() == 7
    assert parts["num_mask_positives"].numpy() == 5
    assert parts["num_truncated_positives"].numpy() == 2
    # Category loss is untouched by truncation; Dice mean is over kept cells 2, 7, 9 and 0, 1.
    kept = {k: v.copy() for k, v in targets.items()}
    kept["cell_class"][0, [13, 18]] = -1
    _, want_mask = np_solov2_loss(outputs, kept, NUM_CLASSES)
    want_category, _ = np_solov2_loss(outputs, targets, NUM_CLASSES)
    np.testing.assert_allclose(parts["category_loss"].numpy(), want_category, rtol=1e-5)
    np.testing.assert_allclose(parts["mask_loss"].numpy(), want_mask, rtol=1e-5)


@pytest.mark.parametrize(
    "positives, max_positives",
    [
        ([[0, 3, 4, 17, 19], [11], []], 8),  # buffer cut to 5 of 8 slots
        ([[2, 7, 9, 13, 18], [0, 1]], 3),  # truncated: the cut changes nothing
        ([[], []], 8),  # no positive anywhere: one slot, mask loss 0
    ],
)
def test_trimmed_buffer_gives_the_static_buffers_loss_and_gradients(positives, max_positives):
    rng = np.random.default_rng(9)
    outputs, targets = make_batch(rng, positives)
    # Unknown batch and cell-instance dims, as in the trainer's traced-once step.
    spec = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in outputs.items()}

    def loss_and_grads(trim_buffer):
        @tf.function(input_signature=[spec])
        def step(out):
            with tf.GradientTape() as tape:
                tape.watch(out)
                parts = solov2_loss(
                    out,
                    targets,
                    num_classes=NUM_CLASSES,
                    max_positives=max_positives,
                    trim_buffer=trim_buffer,
                )
            return parts, tape.gradient(parts["total_loss"], out)

        return step({k: tf.constant(v) for k, v in outputs.items()})

    trimmed, trimmed_grads = loss_and_grads(True)
    static, static_grads = loss_and_grads(False)
    for key in static:
        np.testing.assert_allclose(trimmed[key].numpy(), static[key].numpy(), rtol=1e-6)
    for key in static_grads:
        np.testing.assert_allclose(
            trimmed_grads[key].numpy(), static_grads[key].numpy(), rtol=1e-5, atol=1e-7
        )
    if not any(positives):
        assert trimmed["mask_loss"].numpy() == 0.0
        assert not np.any(trimmed_grads["kernels"].numpy())


def test_split_batch_with_global_counts_sums_to_full_batch_loss():
    rng = np.random.default_rng(7)
    outputs, targets = make_batch(rng, [[0, 3, 4], [], [5, 6, 7, 8, 9, 10], [19]])
    full = loss_fn(outputs, targets, max_positives=4)
    halves = [
        ({k: v[:2] for k, v in outputs.items()}, {k: v[:2] for k, v in targets.items()}),
        ({k: v[2:] for k, v in outputs.items()}, {k: v[2:] for k, v in targets.items()}),
    ]
    counts = [positive_counts(t["cell_class"], max_positives=4) for _, t in halves]
    global_pos = sum(c[0] for c in counts)
    global_mask = sum(c[1] for c in counts)
    total = 0.0
    for out, tgt in halves:
        part = solov2_loss(
            out,
            tgt,
            num_classes=NUM_CLASSES,
            max_positives=4,
            global_num_positives=global_pos,
            global_num_mask_positives=global_mask,
        )
        total += part["total_loss"].numpy()
    np.testing.assert_allclose(total, full["total_loss"].numpy(), rtol=1e-5)
    # Default strategy: the all-reduce is the identity.
    local = global_positive_counts(targets["cell_class"], max_positives=4)
    assert [float(c) for c in local] == [10.0, 8.0]


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from models.losses import global_positive_counts, solov2_loss
    from tests.test_losses import NUM_CLASSES, make_batch

    outputs, targets = make_batch(np.random.default_rng(8), [[0, 3], [4, 5, 6], [], [9]])
    single = solov2_loss(outputs, targets, num_classes=NUM_CLASSES, max_positives=8)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    data = tf.data.Dataset.from_tensors((outputs, targets)).unbatch().batch(4)
    dist = strategy.experimental_distribute_dataset(data)

    @tf.function
    def step(out, tgt):
        n_pos, n_mask = global_positive_counts(tgt["cell_class"], max_positives=8)
        return solov2_loss(out, tgt, num_classes=NUM_CLASSES, max_positives=8,
                           global_num_positives=n_pos, global_num_mask_positives=n_mask)

    per_replica = strategy.run(step, args=next(iter(dist)))
    total = strategy.reduce("SUM", per_replica["total_loss"], axis=None)
    np.testing.assert_allclose(total.numpy(), single["total_loss"].numpy(), rtol=1e-5)
    print("OK", total.numpy())
    """
)


def test_mirrored_strategy_matches_single_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
