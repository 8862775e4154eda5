"""Matrix NMS vs sequential hard mask NMS on 500 candidates at 1/4 of an 800x1344 input.

Prints one JSON object. Candidates are clusters of jittered ellipses (several near-duplicate
masks per object, as SOLO's neighbouring cells produce), 6 classes, sorted by score.

Timings (best of ``--repeats`` warm runs, milliseconds; best-of because the CPU is shared):

- ``matrix_nms_ms``: ``models.postprocess.matrix_nms`` in a ``tf.function`` (IoU matmul + decay).
- ``hard_nms_tf_ms``: greedy class-aware hard NMS (IoU > 0.5 suppresses), TF ``tf.function``:
  the same IoU matmul, then a ``tf.while_loop`` over the 500 candidates in score order.
- ``hard_nms_numpy_ms``: the plain NumPy version: a Python loop over candidates in score order;
  each kept candidate computes its IoU with the remaining same-class candidates
  (vectorised over them) and suppresses those above 0.5.
- ``*_iou_given_ms``: NMS only, from a precomputed IoU matrix (as in the paper's comparison):
  ``matrix_nms_from_iou`` vs the TF while loop vs a NumPy Python loop.

Run: ``python -m benchmarks.matrix_nms [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.postprocess import matrix_nms, matrix_nms_from_iou  # noqa: E402

HEIGHT, WIDTH = 200, 336  # mask features of a padded 800x1344 input
NUM_CANDIDATES = 500
NUM_CLASSES = 6
IOU_THRESHOLD = 0.5


def make_candidates(seed: int = 0):
    """Masks [N, H, W] float32 {0,1}, labels [N] int32, scores [N] float32 descending."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    masks, labels, scores = [], [], []
    while len(masks) < NUM_CANDIDATES:
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = np.exp(rng.uniform(np.log(3), np.log(80), size=2))
        angle = rng.uniform(0, np.pi)
        label = rng.integers(NUM_CLASSES)
        base = rng.uniform(0.2, 0.95)
        for _ in range(rng.integers(3, 12)):  # near-duplicates of one object
            jy, jx = rng.normal(0, 0.15 * ry), rng.normal(0, 0.15 * rx)
            sy, sx = ry * rng.uniform(0.8, 1.2), rx * rng.uniform(0.8, 1.2)
            dy, dx = yy - cy - jy, xx - cx - jx
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            masks.append(((u / sx) ** 2 + (v / sy) ** 2 <= 1.0).astype(np.float32))
            # Multi-label: now and then the same mask under a second class.
            labels.append(label if rng.random() > 0.1 else rng.integers(NUM_CLASSES))
            scores.append(base * rng.uniform(0.6, 1.0))
    masks = np.stack(masks[:NUM_CANDIDATES])
    labels = np.asarray(labels[:NUM_CANDIDATES], np.int32)
    scores = np.asarray(scores[:NUM_CANDIDATES], np.float32)
    order = np.argsort(-scores, kind="stable")
    return masks[order], labels[order], scores[order]


def iou_matrix(masks: tf.Tensor) -> tf.Tensor:
    flat = tf.reshape(masks, [tf.shape(masks)[0], -1])
    areas = tf.reduce_sum(flat, axis=1)
    inter = tf.matmul(flat, flat, transpose_b=True)
    return tf.math.divide_no_nan(inter, areas[:, None] + areas[None, :] - inter)


def hard_nms_from_iou_tf(iou: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Greedy: candidate i (score order) is kept unless a kept same-class k < i has IoU > thr."""
    n = tf.shape(iou)[0]
    same_class = tf.equal(labels[:, None], labels[None, :])

    def body(i, keep):
        suppressed = tf.reduce_any(keep & same_class[:, i] & (iou[:, i] > IOU_THRESHOLD))
        return i + 1, tf.tensor_scatter_nd_update(keep, [[i]], [~suppressed])

    _, keep = tf.while_loop(lambda i, _: i < n, body, [0, tf.zeros([n], tf.bool)])
    return keep


def hard_nms_numpy(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    flat = masks.reshape(len(masks), -1)
    areas = flat.sum(1)
    suppressed = np.zeros(len(masks), bool)
    keep = np.zeros(len(masks), bool)
    for i in range(len(masks)):
        if suppressed[i]:
            continue
        keep[i] = True
        rest = np.nonzero(~suppressed & (labels == labels[i]) & (np.arange(len(masks)) > i))[0]
        if len(rest):
            inter = flat[rest] @ flat[i]
            suppressed[rest[inter / (areas[rest] + areas[i] - inter) > IOU_THRESHOLD]] = True
    return keep


def hard_nms_from_iou_numpy(iou: np.ndarray, labels: np.ndarray) -> np.ndarray:
    keep = np.zeros(len(labels), bool)
    for i in range(len(labels)):
        keep[i] = not any(
            keep[k] and labels[k] == labels[i] and iou[k, i] > IOU_THRESHOLD for k in range(i)
        )
    return keep


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up (tracing)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    masks_np, labels_np, scores_np = make_candidates()
    masks, labels, scores = map(tf.constant, (masks_np, labels_np, scores_np))
    valid = tf.ones([NUM_CANDIDATES], tf.bool)

    matrix_fn = tf.function(lambda m, lab, s: matrix_nms(m, lab, s, valid=valid))
    hard_fn = tf.function(lambda m, lab: hard_nms_from_iou_tf(iou_matrix(m), lab))
    iou_fn = tf.function(iou_matrix)
    iou = iou_fn(masks)
    iou_np = iou.numpy()
    matrix_iou_fn = tf.function(lambda i, lab, s: matrix_nms_from_iou(i, lab, s, valid))
    hard_iou_fn = tf.function(hard_nms_from_iou_tf)

    results = {
        "candidates": NUM_CANDIDATES,
        "mask_size": [HEIGHT, WIDTH],
        "classes": NUM_CLASSES,
        "hard_nms_iou_threshold": IOU_THRESHOLD,
        "cpu_threads": os.cpu_count(),
        "device": "CPU",
        "tensorflow": tf.__version__,
        "repeats": args.repeats,
        "matrix_nms_ms": best_ms(lambda: matrix_fn(masks, labels, scores).numpy(), args.repeats),
        "hard_nms_tf_ms": best_ms(lambda: hard_fn(masks, labels).numpy(), args.repeats),
        "hard_nms_numpy_ms": best_ms(lambda: hard_nms_numpy(masks_np, labels_np), args.repeats),
        "iou_matrix_ms": best_ms(lambda: iou_fn(masks).numpy(), args.repeats),
        "matrix_nms_iou_given_ms": best_ms(
            lambda: matrix_iou_fn(iou, labels, scores).numpy(), args.repeats
        ),
        "hard_nms_tf_iou_given_ms": best_ms(lambda: hard_iou_fn(iou, labels).numpy(), args.repeats),
        "hard_nms_numpy_iou_given_ms": best_ms(
            lambda: hard_nms_from_iou_numpy(iou_np, labels_np), args.repeats
        ),
    }
    hard_keep = hard_nms_numpy(masks_np, labels_np)
    assert np.array_equal(hard_keep, hard_iou_fn(iou, labels).numpy())
    results["hard_nms_kept"] = int(hard_keep.sum())
    results["matrix_nms_kept_at_0.05"] = int(
        np.sum(matrix_fn(masks, labels, scores).numpy() >= 0.05)
    )
    results["speedup_vs_hard_tf"] = results["hard_nms_tf_ms"] / results["matrix_nms_ms"]
    results["speedup_vs_hard_numpy"] = results["hard_nms_numpy_ms"] / results["matrix_nms_ms"]
    results["speedup_iou_given_vs_hard_tf"] = (
        results["hard_nms_tf_iou_given_ms"] / results["matrix_nms_iou_given_ms"]
    )
    results["speedup_iou_given_vs_hard_numpy"] = (
        results["hard_nms_numpy_iou_given_ms"] / results["matrix_nms_iou_given_ms"]
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
