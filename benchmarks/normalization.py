"""The model's normalization layers against Keras's own, forward and backward, on the same input.

Prints one JSON object. For each case, one `tf.function` computes the layer's output and the
gradients of a fixed loss with respect to the input, gamma and beta, as a train step does:

- ``group_norm``: `models.ops.GroupNormalization` (per-channel sums) against
  `keras.layers.GroupNormalization` (group-shaped moments), with the shapes of `demo_cpu`'s
  instance head (S = 40, 64 channels, 2 per group) and mask-feature branch (1/4 scale,
  32 channels, 1 per group), and the official head (S = 40, 512 channels, 16 per group).
- ``batch_norm``: `models.ops.FusedBatchNormalization` (TensorFlow's fused kernel) against
  `keras.layers.BatchNormalization` in training mode, with the shapes of `demo_cpu`'s
  ResNet-18 stem and stage 1 (width 32) and an official stage-1 map (64 channels).

Timings are medians of per-block means, the two layers in alternating blocks so that machine
load hits both alike; ``speedup`` = Keras / ours. Each case also reports the largest
difference from Keras in the output and the input gradient (relative to their largest value).

Run: ``python -m benchmarks.normalization [--dtype bfloat16] [--blocks 5] [--steps 20]``.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import ops  # noqa: E402

GROUP_NORM_CASES = {
    "demo_head_s40": ((4, 40, 40, 64), 32),
    "demo_mask_branch": ((4, 64, 88, 32), 32),
    "official_head_s40": ((2, 40, 40, 512), 32),
}
BATCH_NORM_CASES = {
    "demo_stem": (4, 128, 176, 32),
    "demo_stage1": (4, 64, 88, 32),
    "official_stage1": (2, 200, 336, 64),
}


def _train_step(layer, x, **call_kwargs):
    """A tf.function: (output, d loss / d [x, gamma, beta]) for a loss that weights every output."""
    weights = tf.cast(tf.random.stateless_normal(x.shape, seed=(1, 2)), tf.float32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **call_kwargs)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
        return (y, *tape.gradient(loss, [x, layer.gamma, layer.beta]))

    return step


def _relative_difference(a, b) -> float:
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
    return float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(b)) + 1e-12))


def _compare(ours, reference, x, blocks, steps, **call_kwargs) -> dict:
    for layer in (ours, reference):
        layer.build(x.shape)
    reference.set_weights(ours.get_weights())
    step_ours = _train_step(ours, x, **call_kwargs)
    step_reference = _train_step(reference, x, **call_kwargs)
    out_ours, out_reference = step_ours(), step_reference()  # Also the warm-up (tracing).
    times = {"ours": [], "keras": []}
    for _ in range(blocks):
        for name, step in (("ours", step_ours), ("keras", step_reference)):
            start = time.perf_counter()
            for _ in range(steps):
                result = step()
            float(tf.reduce_sum(tf.cast(result[1], tf.float32)))  # Wait for the last step.
            times[name].append((time.perf_counter() - start) / steps * 1000)
    ours_ms, keras_ms = statistics.median(times["ours"]), statistics.median(times["keras"])
    return {
        "shape": list(x.shape),
        "ours_ms": round(ours_ms, 3),
        "keras_ms": round(keras_ms, 3),
        "speedup": round(keras_ms / ours_ms, 3),
        "output_rel_diff": _relative_difference(out_ours[0], out_reference[0]),
        "input_grad_rel_diff": _relative_difference(out_ours[1], out_reference[1]),
    }


def run(dtype: str, blocks: int, steps: int) -> dict:
    results = {
        "dtype": dtype,
        "cpu_threads": os.cpu_count(),
        "tensorflow": tf.__version__,
        "blocks": blocks,
        "steps": steps,
    }
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if dtype == "float32" else f"mixed_{dtype}")
    try:
        for name, (shape, groups) in GROUP_NORM_CASES.items():
            x = tf.cast(tf.random.stateless_normal(shape, seed=(0, 1)) * 2 + 1, dtype)
            results[f"group_norm_{name}"] = _compare(
                ops.GroupNormalization(groups=groups, epsilon=1e-5),
                keras.layers.GroupNormalization(groups=groups, epsilon=1e-5),
                x,
                blocks,
                steps,
            )
        for name, shape in BATCH_NORM_CASES.items():
            x = tf.cast(tf.random.stateless_normal(shape, seed=(0, 1)) * 2 + 1, dtype)
            results[f"batch_norm_{name}"] = _compare(
                ops.FusedBatchNormalization(epsilon=1e-5, momentum=0.9),
                keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9),
                x,
                blocks,
                steps,
                training=True,
            )
    finally:
        keras.config.set_dtype_policy(policy)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(run(args.dtype, args.blocks, args.steps)))


if __name__ == "__main__":
    main()
