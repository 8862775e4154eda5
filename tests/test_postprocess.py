"""Post-processing against plain loop references written from the official algorithm."""

import numpy as np
import pytest
import tensorflow as tf

from models.postprocess import detect, matrix_nms, paste_masks, point_nms

GRIDS, STRIDES = (4, 3), (8, 16)
NUM_CELLS = 16 + 9


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def loop_point_nms(heat):
    """[S, S, C]: keep (i, j) if >= its up, left and up-left neighbours."""
    out = np.zeros_like(heat)
    size = heat.shape[0]
    for i in range(size):
        for j in range(size):
            for c in range(heat.shape[2]):
                neighbours = [heat[i + di, j + dj, c] for di in (-1, 0) for dj in (-1, 0)
                              if i + di >= 0 and j + dj >= 0]  # fmt: skip
                if heat[i, j, c] == max(neighbours):
                    out[i, j, c] = heat[i, j, c]
    return out


def loop_matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """SOLOv2 App. A written as loops: masks [N, h, w] bool, sorted by descending score."""
    n = len(scores)
    iou = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] == labels[j]:
                union = np.logical_or(masks[i], masks[j]).sum()
                iou[i, j] = np.logical_and(masks[i], masks[j]).sum() / union
    compensate = [max([iou[k, i] for k in range(i)], default=0.0) for i in range(n)]

    def f(x):
        return np.exp(-sigma * x * x) if kernel == "gaussian" else 1.0 - x

    decayed = []
    for j in range(n):
        ratios = [f(iou[i, j]) / f(compensate[i]) for i in range(j) if labels[i] == labels[j]]
        decayed.append(scores[j] * min([1.0, *ratios]))
    return np.array(decayed)


def loop_detect(logits, kernels, feats, *, nms_pre=500, max_det=100, kernel="gaussian"):
    """The official get_seg_single on one image, with dynamic sizes."""
    probs = _sigmoid(logits.astype(np.float32))
    levels, start = [], 0
    for s in GRIDS:
        levels.append(
            loop_point_nms(probs[start : start + s * s].reshape(s, s, -1)).reshape(s * s, -1)
        )
        start += s * s
    probs = np.concatenate(levels)
    stride_of_cell = np.concatenate([np.full(s * s, st) for s, st in zip(GRIDS, STRIDES)])
    cells, classes = np.nonzero(probs > 0.1)
    scores = probs[cells, classes]
    h, w, e = feats.shape
    soft = _sigmoid(kernels[cells] @ feats.reshape(-1, e).T).reshape(-1, h, w)
    binary = soft > 0.5
    area = binary.sum((1, 2))
    keep = area > stride_of_cell[cells]
    soft, binary, area, scores, classes = (
        soft[keep],
        binary[keep],
        area[keep],
        scores[keep],
        classes[keep],
    )
    scores = scores * (soft * binary).sum((1, 2)) / area
    order = np.argsort(-scores, kind="stable")[:nms_pre]
    soft, binary, scores, classes = soft[order], binary[order], scores[order], classes[order]
    scores = loop_matrix_nms(binary, classes, scores, kernel=kernel)
    keep = scores >= 0.05
    soft, scores, classes = soft[keep], scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")[:max_det]
    return soft[order], scores[order], classes[order]


def random_masks(rng, n, h=12, w=14):
    """Overlapping rectangles, so IoUs span 0..1."""
    masks = np.zeros((n, h, w), bool)
    for k in range(n):
        y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
        masks[k, y0 : y0 + rng.integers(3, h - y0 + 1), x0 : x0 + rng.integers(3, w - x0 + 1)] = (
            True
        )
    return masks


def test_point_nms_matches_loop():
    rng = np.random.default_rng(0)
    heat = rng.random((2, 5, 5, 3)).astype(np.float32)
    heat[0, 1, 1, 0] = heat[0, 1, 2, 0]  # a tie: both kept
    got = point_nms(heat).numpy()
    for b in range(2):
        np.testing.assert_array_equal(got[b], loop_point_nms(heat[b]))


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_matches_loop(kernel):
    rng = np.random.default_rng(1)
    n = 16
    masks = random_masks(rng, n)
    labels = rng.integers(0, 3, n)
    scores = np.sort(rng.random(n))[::-1].astype(np.float32)
    got = matrix_nms(masks, labels, scores, kernel=kernel).numpy()
    want = loop_matrix_nms(masks, labels, scores, kernel=kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.any(got < scores - 1e-3)  # the test would be vacuous without some decay


def test_matrix_nms_batched_with_padding_matches_loop_on_valid_part():
    rng = np.random.default_rng(2)
    n, counts = 10, [7, 10]
    masks = np.stack([random_masks(rng, n), random_masks(rng, n)])
    labels = rng.integers(0, 2, (2, n))
    scores = np.sort(rng.random((2, n)), axis=1)[:, ::-1].astype(np.float32)
    valid = np.arange(n)[None] < np.array(counts)[:, None]
    # Padding holds copies of valid masks with high scores: it must not decay anything.
    masks[0, 7:] = masks[0, :3]
    labels[0, 7:] = labels[0, :3]
    got = matrix_nms(masks, labels, scores, valid=tf.constant(valid)).numpy()
    for b, count in enumerate(counts):
        want = loop_matrix_nms(masks[b, :count], labels[b, :count], scores[b, :count])
        np.testing.assert_allclose(got[b, :count], want, rtol=1e-5, atol=1e-6)
        assert np.all(got[b, count:] == 0)


def test_matrix_nms_decays_same_class_only():
    mask = np.zeros((2, 6, 6), bool)
    mask[:, 1:5, 1:5] = True
    scores = np.array([0.9, 0.8], np.float32)
    other_class = matrix_nms(mask, np.array([0, 1]), scores).numpy()
    same_class = matrix_nms(mask, np.array([1, 1]), scores).numpy()
    np.testing.assert_allclose(other_class, scores)
    np.testing.assert_allclose(same_class, [0.9, 0.8 * np.exp(-2.0)], rtol=1e-6)


@pytest.fixture(scope="module")
def detect_fn():
    @tf.function
    def run(logits, kernels, feats, nms_pre=500, max_det=100, max_cells=1000, kernel="gaussian"):
        return detect(
            logits,
            kernels,
            feats,
            grids=GRIDS,
            strides=STRIDES,
            nms_pre=nms_pre,
            max_detections=max_det,
            max_candidate_cells=max_cells,
            mask_chunk_size=4,
            nms_kernel=kernel,
        )

    return run


def test_detect_static_shapes_and_empty_image(detect_fn):
    h, w, e = 10, 12, 4
    spec = [
        tf.TensorSpec([2, NUM_CELLS, 3]),
        tf.TensorSpec([2, NUM_CELLS, e]),
        tf.TensorSpec([2, h, w, e]),
    ]
    concrete = detect_fn.get_concrete_function(*spec, max_det=7)
    shapes = {k: v.shape.as_list() for k, v in concrete.structured_outputs.items()}
    assert shapes == {
        "masks": [2, 7, h, w],
        "scores": [2, 7],
        "classes": [2, 7],
        "num_detections": [2],
    }
    rng = np.random.default_rng(3)
    logits = np.full((2, NUM_CELLS, 3), -10.0, np.float32)  # nothing above 0.1
    out = concrete(
        tf.constant(logits),
        tf.constant(rng.normal(size=(2, NUM_CELLS, e)), tf.float32),
        tf.constant(rng.normal(size=(2, h, w, e)), tf.float32),
    )
    assert out["num_detections"].numpy().tolist() == [0, 0]
    assert np.all(out["scores"].numpy() == 0) and np.all(out["masks"].numpy() == 0)
    assert np.all(out["classes"].numpy() == -1)


def square_features(h, w, regions):
    """One channel per region: +10 inside, -10 outside; kernel e_k selects region k."""
    feats = np.full((h, w, len(regions)), -10.0, np.float32)
    for k, (y0, y1, x0, x1) in enumerate(regions):
        feats[y0:y1, x0:x1, k] = 10.0
    return feats


def test_detect_known_kernel_gives_known_mask_class_and_score(detect_fn):
    h, w = 10, 12
    feats = square_features(h, w, [(2, 7, 3, 9)])  # area 30 > stride 8
    logits = np.full((2, NUM_CELLS, 3), -10.0, np.float32)
    kernels = np.zeros((2, NUM_CELLS, 1), np.float32)
    logits[0, 5, 2] = np.log(0.8 / 0.2)  # cell 5 (level 0), class 2, p = 0.8
    kernels[0, 5, 0] = 1.0
    out = detect_fn(logits, kernels, np.stack([feats, feats]))
    assert out["num_detections"].numpy().tolist() == [1, 0]
    assert out["classes"].numpy()[0, 0] == 2
    inside = _sigmoid(10.0)
    np.testing.assert_allclose(out["scores"].numpy()[0, 0], 0.8 * inside, rtol=1e-5)
    np.testing.assert_allclose(out["masks"].numpy()[0, 0], _sigmoid(feats[..., 0]), rtol=1e-5)
    assert np.all(out["masks"].numpy()[0, 1:] == 0)


def test_detect_area_filter_and_maskness(detect_fn):
    h, w = 10, 12
    # Region 0: 8 pixels at level 0 (stride 8) -> dropped. Region 1: 9 pixels -> kept.
    # Region 2: 16 pixels at level 1 (stride 16) -> dropped; region 3: 4x5 with soft values.
    feats = square_features(h, w, [(0, 2, 0, 4), (0, 3, 6, 9), (6, 10, 0, 4), (5, 9, 6, 11)])
    feats[5:7, 6:11, 3] = 1.0  # sigmoid 0.731 on 10 of its 20 pixels, 0.99995 on the rest
    logits = np.full((1, NUM_CELLS, 3), -10.0, np.float32)
    kernels = np.zeros((1, NUM_CELLS, 4), np.float32)
    for cell, region, cls in [(0, 0, 0), (5, 1, 1), (16, 2, 1), (24, 3, 0)]:
        logits[0, cell, cls] = 2.0
        kernels[0, cell, region] = 1.0
    out = detect_fn(logits, kernels, feats[None])
    assert out["num_detections"].numpy().tolist() == [2]
    p = _sigmoid(2.0)
    maskness = (10 * _sigmoid(1.0) + 10 * _sigmoid(10.0)) / 20
    # Disjoint masks: no decay; sorted by score.
    np.testing.assert_allclose(
        out["scores"].numpy()[0, :2], [p * _sigmoid(10.0), p * maskness], rtol=1e-5
    )
    assert out["classes"].numpy()[0, :2].tolist() == [1, 0]


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_detect_matches_official_loop_on_random_outputs(detect_fn, kernel):
    rng = np.random.default_rng(4)
    h, w, e, c = 10, 12, 3, 3
    logits = rng.normal(-2.0, 1.5, size=(2, NUM_CELLS, c)).astype(np.float32)
    kernels = rng.normal(size=(2, NUM_CELLS, e)).astype(np.float32)
    feats = rng.normal(size=(2, h, w, e)).astype(np.float32) * 2
    # A bias channel spreads mask areas over 0..h*w: 27 of the 87 candidates fail the area
    # filter, 38 and 49 candidates go into nms_pre = 12.
    feats[..., 0] = 1.0
    kernels[..., 0] = rng.normal(-2.0, 2.0, size=(2, NUM_CELLS))
    out = detect_fn(logits, kernels, feats, nms_pre=12, max_det=6, kernel=kernel)
    for b in range(2):
        masks, scores, classes = loop_detect(
            logits[b], kernels[b], feats[b], nms_pre=12, max_det=6, kernel=kernel
        )
        k = len(scores)
        assert 2 < k <= 6
        assert out["num_detections"].numpy()[b] == k
        np.testing.assert_allclose(out["scores"].numpy()[b, :k], scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["classes"].numpy()[b, :k], classes)
        np.testing.assert_allclose(out["masks"].numpy()[b, :k], masks, rtol=1e-5, atol=1e-6)


def test_detect_candidate_cell_bound(detect_fn):
    """Exact while candidate cells fit the bound; above it, the lowest-scored cells are dropped."""
    rng = np.random.default_rng(5)
    h, w, e = 10, 12, 3
    logits = rng.normal(0.0, 1.0, size=(1, NUM_CELLS, 2)).astype(np.float32)
    kernels = rng.normal(size=(1, NUM_CELLS, e)).astype(np.float32)
    feats = rng.normal(size=(1, h, w, e)).astype(np.float32) * 2
    probs = np.concatenate(
        [loop_point_nms(_sigmoid(logits[0, :16]).reshape(4, 4, 2)).reshape(16, 2),
         loop_point_nms(_sigmoid(logits[0, 16:]).reshape(3, 3, 2)).reshape(9, 2)]
    )  # fmt: skip
    num_candidate_cells = int(np.sum(np.any(probs > 0.1, axis=1)))
    exact = detect_fn(logits, kernels, feats, max_cells=num_candidate_cells)
    full = detect_fn(logits, kernels, feats, max_cells=NUM_CELLS)
    np.testing.assert_allclose(exact["scores"].numpy(), full["scores"].numpy(), rtol=1e-6)
    _, want_scores, _ = loop_detect(logits[0], kernels[0], feats[0])
    np.testing.assert_allclose(
        full["scores"].numpy()[0, : len(want_scores)], want_scores, rtol=1e-5
    )
    truncated = detect_fn(logits, kernels, feats, max_cells=num_candidate_cells - 3)
    assert truncated["num_detections"].numpy()[0] <= full["num_detections"].numpy()[0]
    assert np.all(np.isfinite(truncated["scores"].numpy()))


def test_paste_masks_is_identical_eager_and_in_a_graph():
    """Predict pastes eagerly, the evaluator inside a tf.function: they must agree bit for bit.

    Dividing by 255 before resizing flipped ~2 pixels per 100k here (Grappler rewrites x / 255
    as x * (1 / 255) in the graph); thresholding in the quantised domain does not.
    """
    rng = np.random.default_rng(0)
    graph_paste = tf.function(paste_masks, reduce_retracing=True)
    for _ in range(4):
        masks = rng.integers(0, 256, size=(20, 88, 88))
        near = rng.integers(125, 131, size=masks.shape)  # Interpolates to about the threshold.
        masks = np.where(rng.random(masks.shape) < 0.5, near, masks).astype(np.uint8)
        info = tf.constant([*rng.integers(100, 400, size=2), *rng.integers(200, 352, size=2)])
        eager = paste_masks(tf.constant(masks), info).numpy()
        assert eager.shape == (20, int(info[0]), int(info[1]))
        assert 0.2 < eager.mean() < 0.8  # Both sides of the threshold occur.
        np.testing.assert_array_equal(eager, graph_paste(tf.constant(masks), info).numpy())
