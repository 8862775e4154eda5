"""SOLOv2 targets: the vectorized TF function against a literal port of the official algorithm.

The reference below follows WXinlong/SOLO `solov2_target_single` line by line with Python loops
(levels outer, instances inner, annotation order), scipy's centre of mass and a NumPy port of
cv2's bilinear uint8 resize; it only maps the official outputs to our compact per-cell format
(later instance wins a shared cell, see `compute_targets`). `compute_targets_from_runs` (the
same targets from run lengths and a resize's index maps) is checked against both.
"""

import math
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from models.targets import (
    GRIDS,
    LEVEL_OFFSETS,
    NUM_CELLS,
    SCALE_RANGES,
    SIGMA,
    _pack_bits,
    compute_targets,
    compute_targets_from_runs,
    compute_targets_from_runs_batch,
    downsample_masks,
    level_offsets,
    num_cells,
    resize_starts,
    target_shapes,
    targets_of_image,
    unpack_masks,
)

COCO_TINY = pathlib.Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"


# --------------------------------------------------------------------------------------------
# Reference (plain NumPy, loops)


def cv2_linear_resize_uint8(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2.resize(mask, (out_w, out_h), interpolation=INTER_LINEAR) for a 2-D uint8 array.

    Source coordinate (d + 0.5) * in / out - 0.5, clamped at the borders; the weighted sum is
    rounded half up as cv2's fixed-point cast does (exact here: weights are multiples of 1/4).
    """

    def taps(n_in: int, n_out: int):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        lo = np.floor(src).astype(np.int64)
        frac = src - lo
        frac[lo < 0], lo[lo < 0] = 0.0, 0
        hi = np.minimum(lo + 1, n_in - 1)
        frac[lo >= n_in - 1] = 0.0
        return lo, hi, frac

    y0, y1, fy = taps(mask.shape[0], out_h)
    x0, x1, fx = taps(mask.shape[1], out_w)
    m = mask.astype(np.float64)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    value = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return np.floor(value + 0.5).astype(np.uint8)


def reference_targets(boxes, classes, masks, is_crowd, grids=GRIDS, scale_ranges=SCALE_RANGES):
    """Official assignment, literally; boxes `[ymin, xmin, ymax, xmax]` float32."""
    n, height, width = masks.shape
    upsampled_size = (height, width)  # = mask feature size * 4
    sigma = np.float32(SIGMA)
    # Official: torch float32 on the GT boxes; crowd boxes never reach the head (gt_bboxes_ignore).
    box_h = boxes[:, 2] - boxes[:, 0]
    box_w = boxes[:, 3] - boxes[:, 1]
    with np.errstate(invalid="ignore"):
        gt_areas = np.sqrt(box_w * box_h)
    half_hs = np.float32(0.5) * box_h * sigma
    half_ws = np.float32(0.5) * box_w * sigma

    cell_class, cell_instance = [], []
    for (lower_bound, upper_bound), num_grid in zip(scale_ranges, grids):
        cate_label = np.full((num_grid, num_grid), -1, np.int64)
        ins_label = np.full((num_grid, num_grid), -1, np.int64)
        for i in range(n):
            if is_crowd[i] or not (gt_areas[i] >= lower_bound and gt_areas[i] <= upper_bound):
                continue
            seg_mask = masks[i]
            if seg_mask.sum() == 0:
                continue
            half_h, half_w = float(half_hs[i]), float(half_ws[i])
            center_h, center_w = ndimage.center_of_mass(seg_mask)
            coord_w = int((center_w / upsampled_size[1]) // (1.0 / num_grid))
            coord_h = int((center_h / upsampled_size[0]) // (1.0 / num_grid))
            top_box = max(0, int(((center_h - half_h) / upsampled_size[0]) // (1.0 / num_grid)))
            down_box = min(
                num_grid - 1, int(((center_h + half_h) / upsampled_size[0]) // (1.0 / num_grid))
            )
            left_box = max(0, int(((center_w - half_w) / upsampled_size[1]) // (1.0 / num_grid)))
            right_box = min(
                num_grid - 1, int(((center_w + half_w) / upsampled_size[1]) // (1.0 / num_grid))
            )
            top = max(top_box, coord_h - 1)
            down = min(down_box, coord_h + 1)
            left = max(coord_w - 1, left_box)
            right = min(right_box, coord_w + 1)
            cate_label[top : (down + 1), left : (right + 1)] = classes[i]
            ins_label[top : (down + 1), left : (right + 1)] = i
        cell_class.append(cate_label.reshape(-1))
        cell_instance.append(ins_label.reshape(-1))
    cell_instance = np.concatenate(cell_instance)
    instance_masks = np.zeros((n, height // 4, width // 4), np.uint8)
    for i in range(n):
        instance_masks[i] = cv2_linear_resize_uint8(masks[i], height // 4, width // 4)
    return {
        "cell_class": np.concatenate(cell_class),
        "cell_instance": cell_instance,
        "instance_masks": instance_masks,
        "instance_num_cells": np.array([(cell_instance == i).sum() for i in range(n)]),
    }


# --------------------------------------------------------------------------------------------
# Inputs


def random_instances(rng: np.random.Generator, height: int, width: int, n: int):
    """Ellipses and rectangles of all sizes, overlapping, plus degenerate and boundary cases."""
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((n, height, width), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    # Let the image hold everything from tiny objects to level-4 (>= 384 px) ones.
    max_size = min(height, width) * 1.2
    for i in range(n):
        size_h = math.exp(rng.uniform(math.log(2), math.log(max_size)))
        size_w = size_h * math.exp(rng.uniform(-0.7, 0.7))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.5:
            inside = ((yy - cy) / (size_h / 2)) ** 2 + ((xx - cx) / (size_w / 2)) ** 2 <= 1
        else:
            inside = (np.abs(yy + 0.5 - cy) <= size_h / 2) & (np.abs(xx + 0.5 - cx) <= size_w / 2)
        masks[i] = inside
        ys, xs = np.nonzero(masks[i])
        if len(ys):
            boxes[i] = [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        if rng.random() < 0.15:  # a box that does not hug its mask (annotation noise)
            boxes[i] = [cy - size_h, cx - size_w / 3, cy + size_h / 2, cx + size_w]
    kind = rng.integers(0, 10, n)
    masks[kind == 0] = 0  # empty mask (box kept: the mask decides)
    boxes[kind == 1, 2] = boxes[kind == 1, 0]  # zero-height box
    is_crowd = rng.random(n) < 0.1
    classes = rng.integers(0, 80, n).astype(np.int32)
    return boxes, classes, masks, is_crowd


def boundary_instances(height: int, width: int):
    """Rectangles centred exactly mid-image (official `0.5 // (1/40) == 19`) and box scales
    exactly on the range bounds (48, 96, 192, 384), sharing cells."""
    specs = [(48, 48), (96, 96), (192, 192), (64, 144), (384, 384), (65, 65), (33, 95)]
    masks = np.zeros((len(specs), height, width), np.uint8)
    boxes = np.zeros((len(specs), 4), np.float32)
    for i, (h, w) in enumerate(specs):
        y0, x0 = (height - h) // 2, (width - w) // 2
        masks[i, y0 : y0 + h, x0 : x0 + w] = 1
        boxes[i] = [y0, x0, y0 + h, x0 + w]
    return boxes, np.arange(len(specs), dtype=np.int32), masks, np.zeros(len(specs), bool)


def assert_same(actual: dict, expected: dict):
    for key in ("cell_class", "cell_instance", "instance_masks", "instance_num_cells"):
        np.testing.assert_array_equal(np.asarray(actual[key]), expected[key], err_msg=key)


def mask_runs(masks: np.ndarray) -> tf.RaggedTensor:
    """`[N, H, W]` {0,1} masks -> COCO uncompressed RLE run lengths `[N, (M)]` (plain NumPy).

    Column-major pixels, alternating background / foreground runs, background first.
    """
    runs = []
    for mask in masks:
        flat = mask.T.reshape(-1)
        change = np.flatnonzero(np.diff(flat)) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        lengths = np.diff(bounds).tolist()
        runs.append(([0] + lengths) if flat[0] else lengths)
    return tf.RaggedTensor.from_row_lengths(
        np.concatenate([np.zeros(0, np.int64)] + [np.asarray(r, np.int64) for r in runs]),
        [len(r) for r in runs],
    )


def resized_padded(masks, rows, cols, flip, padded_height, padded_width):
    """The masks `compute_targets_from_runs` stands for: select, mirror, zero-pad (NumPy)."""
    resized = masks[:, rows][:, :, cols]
    if flip:
        resized = resized[:, :, ::-1]
    out = np.zeros((len(masks), padded_height, padded_width), np.uint8)
    out[:, : len(rows), : len(cols)] = resized
    return out


def _from_runs(boxes, classes, runs, is_crowd, size, rows, cols, flip, padded):
    return compute_targets_from_runs(
        boxes,
        classes,
        runs,
        is_crowd,
        source_height=size[0],
        source_width=size[1],
        source_rows=rows,
        source_cols=cols,
        flip=flip,
        padded_height=padded[0],
        padded_width=padded[1],
    )


_from_runs_graph = tf.function(
    _from_runs,
    input_signature=[
        tf.TensorSpec([None, 4], tf.float32),
        tf.TensorSpec([None], tf.int32),
        tf.RaggedTensorSpec([None, None], tf.int64),
        tf.TensorSpec([None], tf.bool),
        tf.TensorSpec([2], tf.int32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([], tf.bool),
        tf.TensorSpec([2], tf.int32),
    ],
)


def with_unpacked_masks(targets: dict, resized_height: int, resized_width: int, padded) -> dict:
    """`compute_targets_from_runs` output plus its `instance_masks` unpacked to the full
    `[N, P_h / 4, P_w / 4]`, after checking the packed shape (the resized image's rows and
    columns at 1/4 scale, whole bytes)."""
    packed = targets["packed_masks"]
    assert packed.dtype == tf.uint8
    assert packed.shape[1:] == (-(-resized_height // 4), -(-resized_width // 32))
    quarter = (padded[0] // 4, padded[1] // 4)
    return {**targets, "instance_masks": unpack_masks(packed, *quarter).numpy()}


def from_runs(
    boxes, classes, masks, is_crowd, rows, cols, flip, padded_height, padded_width, graph=False
):
    """`compute_targets_from_runs` on the runs of `[N, H0, W0]` masks (eager or `tf.function`),
    with `instance_masks` unpacked."""
    fn = _from_runs_graph if graph else _from_runs
    targets = fn(
        *(boxes, classes, mask_runs(masks), is_crowd, masks.shape[1:]),
        *(rows, cols, flip, (padded_height, padded_width)),
    )
    return with_unpacked_masks(targets, len(rows), len(cols), (padded_height, padded_width))


# --------------------------------------------------------------------------------------------
# Tests


def test_layout_constants_match_contract():
    assert LEVEL_OFFSETS == (0, 1600, 2896, 3472, 3728) == level_offsets(GRIDS)
    assert NUM_CELLS == 3872 == num_cells(GRIDS)
    assert target_shapes(800, 1216) == {
        "cell_class": (3872,),
        "cell_instance": (3872,),
        "instance_masks": (None, 200, 304),
        "instance_num_cells": (None,),
    }
    with pytest.raises(ValueError):
        target_shapes(801, 1216)


def test_pinned_square():
    """64x64 square centred at 127.5 in 256x256: levels 0 (1..96) and 1 (48..192).

    Level 0, S=40: centre cell int(0.498 // 0.025) = 19; region rows/cols 18..20 -> 9 cells.
    Level 1, S=36: centre 17, region (121.1/256)*36 -> 17 .. (133.9/256)*36 -> 18 -> 2x2 cells.
    """
    masks = np.zeros((1, 256, 256), np.uint8)
    masks[0, 96:160, 96:160] = 1
    out = compute_targets([[96.0, 96.0, 160.0, 160.0]], [5], masks, [False])
    level0 = [i * 40 + j for i in (18, 19, 20) for j in (18, 19, 20)]
    level1 = [1600 + i * 36 + j for i in (17, 18) for j in (17, 18)]
    np.testing.assert_array_equal(np.flatnonzero(out["cell_class"] >= 0), level0 + level1)
    assert set(out["cell_class"].numpy()[level0 + level1]) == {5}
    assert set(out["cell_instance"].numpy()[level0 + level1]) == {0}
    assert out["instance_num_cells"].numpy().tolist() == [13]
    assert out["instance_masks"].numpy().sum() == 16 * 16


def test_exact_mid_image_centre_follows_official_floor_division():
    """Centre of mass 128.0 = exactly half of 256: official `0.5 // (1. / 40) == 19.0`, not 20.

    The 96 px box has scale 96, on both bounds: levels 0 (1..96), 1 (48..192) and 2 (96..384).
    Its region spans more than 3 cells on the 40-grid, so it is the 3x3 block around the centre
    cell: rows/cols 18..20 (19..21 with a naive floor(0.5 * 40)). 36-grid: `0.5 // (1. / 36)
    == 18.0`, rows/cols 17..19. 24-grid: centre 12, region 11..12.
    """
    masks = np.zeros((1, 256, 256), np.uint8)
    masks[0, 124:133, 124:133] = 1
    out = compute_targets([[80.0, 80.0, 176.0, 176.0]], [1], masks, [False])
    level0 = [i * 40 + j for i in (18, 19, 20) for j in (18, 19, 20)]
    level1 = [1600 + i * 36 + j for i in (17, 18, 19) for j in (17, 18, 19)]
    level2 = [2896 + i * 24 + j for i in (11, 12) for j in (11, 12)]
    np.testing.assert_array_equal(
        np.flatnonzero(out["cell_instance"] >= 0), level0 + level1 + level2
    )


@pytest.mark.parametrize(
    ("height", "width", "n", "seed"),
    [(256, 352, 40, 0), (256, 352, 25, 1), (800, 1216, 30, 2), (1088, 800, 20, 3)],
)
def test_matches_reference_on_random_instances(height, width, n, seed):
    inputs = random_instances(np.random.default_rng(seed), height, width, n)
    expected = reference_targets(*inputs)
    # The draw must exercise what it claims to: every level an object of this image can reach,
    # collisions (fewer owned cells than claimed) and degenerate instances.
    for offset, s, (lower, _) in zip(LEVEL_OFFSETS, GRIDS, SCALE_RANGES):
        if lower < min(height, width):
            assert (expected["cell_instance"][offset : offset + s * s] >= 0).any(), s
    assert (expected["instance_num_cells"] == 0).any()
    assert_same(compute_targets(*inputs), expected)


def test_matches_reference_on_boundary_instances():
    for height, width in [(256, 256), (800, 1216)]:
        inputs = boundary_instances(height, width)
        assert_same(compute_targets(*inputs), reference_targets(*inputs))


def test_later_instance_wins_shared_cells():
    masks = np.zeros((2, 256, 256), np.uint8)
    masks[:, 100:150, 100:150] = 1
    boxes = np.array([[100, 100, 150, 150]] * 2, np.float32)
    out = compute_targets(boxes, [3, 7], masks, [False, False])
    positives = out["cell_instance"].numpy() >= 0
    assert set(out["cell_class"].numpy()[positives]) == {7}
    assert set(out["cell_instance"].numpy()[positives]) == {1}
    assert out["instance_num_cells"].numpy().tolist() == [0, positives.sum()]


def test_degenerate_instances_get_no_cells():
    masks = np.zeros((4, 128, 128), np.uint8)
    masks[[0, 2, 3], 30:90, 30:90] = 1  # instance 1: empty mask
    boxes = np.array([[30, 30, 90, 90], [30, 30, 90, 90], [30, 30, 30, 90], [30, 30, 90, 90]])
    is_crowd = [1, 0, 0, 0]  # instance 0: crowd; instance 2: zero-height box
    out = compute_targets(boxes.astype(np.float32), [1, 2, 3, 4], masks, is_crowd)
    assert out["instance_num_cells"].numpy().tolist()[:3] == [0, 0, 0]
    assert out["instance_num_cells"].numpy()[3] > 0
    assert set(out["cell_class"].numpy().tolist()) == {-1, 4}


def test_empty_image():
    out = compute_targets(
        np.zeros((0, 4), np.float32),
        np.zeros((0,), np.int32),
        np.zeros((0, 64, 96), np.uint8),
        np.zeros((0,), bool),
    )
    np.testing.assert_array_equal(out["cell_class"], np.full(NUM_CELLS, -1))
    np.testing.assert_array_equal(out["cell_instance"], np.full(NUM_CELLS, -1))
    assert out["instance_masks"].shape == (0, 16, 24)
    assert out["instance_masks"].dtype == tf.uint8
    assert out["instance_num_cells"].shape == (0,)


def test_rejects_unpadded_masks():
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of 32"):
        compute_targets(
            np.zeros((1, 4), np.float32), [0], np.zeros((1, 64, 100), np.uint8), [False]
        )


def test_downsample_equals_cv2_and_tf_bilinear():
    rng = np.random.default_rng(7)
    # Random pixels plus random shapes: every 2x2 sampled pattern occurs.
    noise = (rng.random((3, 64, 96)) < 0.5).astype(np.uint8)
    shapes = random_instances(rng, 64, 96, 5)[2]
    masks = np.concatenate([noise, shapes])
    ours = downsample_masks(masks).numpy()
    cv2_like = np.stack([cv2_linear_resize_uint8(m, 16, 24) for m in masks])
    tf_bilinear = tf.image.resize(
        masks[..., None].astype(np.float32), [16, 24], method="bilinear", antialias=False
    )
    np.testing.assert_array_equal(ours, cv2_like)
    np.testing.assert_array_equal(ours, (tf_bilinear.numpy()[..., 0] >= 0.5).astype(np.uint8))
    # The sampling rule spelled out: on iff >= 2 of pixels (4d+1, 4d+2)^2 are on.
    block = (
        masks[:, 1::4, 1::4] + masks[:, 2::4, 1::4] + masks[:, 1::4, 2::4] + masks[:, 2::4, 2::4]
    )
    np.testing.assert_array_equal(ours, (block >= 2).astype(np.uint8))


def test_unpack_masks_is_numpy_unpackbits_then_zero_padding():
    """The packed 1/4-scale mask format: `np.packbits` order, top-left corner of the output."""
    packed = np.random.default_rng(3).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    packed[0, 0] = [0, 1, 128, 255]
    expected = np.zeros((3, 9, 40), np.uint8)
    expected[:, :5, :32] = np.unpackbits(packed, axis=-1)
    np.testing.assert_array_equal(unpack_masks(packed, 9, 40), expected)
    assert unpack_masks(np.zeros((0, 2, 1), np.uint8), 4, 8).shape == (0, 4, 8)
    # The packing (a multiply on uint64 words) is its inverse on every byte value.
    every_byte = np.arange(256, dtype=np.uint8)
    bits = np.unpackbits(every_byte[:, np.newaxis], axis=1)
    np.testing.assert_array_equal(_pack_bits(bits), every_byte)


def test_same_results_in_tf_function_and_tf_data():
    rng = np.random.default_rng(11)
    images = [random_instances(rng, 128, 160, n) for n in (6, 0, 12)]
    images.append(random_instances(rng, 192, 128, 3))
    eager = [compute_targets(*image) for image in images]

    signature = [
        tf.TensorSpec([None, 4], tf.float32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, None, None], tf.uint8),
        tf.TensorSpec([None], tf.bool),
    ]
    graph_fn = tf.function(compute_targets, input_signature=signature)
    for image, expected in zip(images, eager):
        assert_same(graph_fn(*image), {k: v.numpy() for k, v in expected.items()})

    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tuple(signature)
    )
    dataset = dataset.map(compute_targets)
    for actual, expected in zip(dataset, eager, strict=True):
        assert actual["cell_class"].shape == (NUM_CELLS,)
        assert_same(actual, {k: v.numpy() for k, v in expected.items()})


def random_index_map(rng: np.random.Generator, size: int, new_size: int) -> np.ndarray:
    """A non-decreasing source index per resized index: a nearest resize, or sorted random picks
    (repeats and skips of any length)."""
    if rng.random() < 0.5:
        return np.minimum((np.arange(new_size) + 0.5) * size / new_size, size - 1).astype(np.int64)
    return np.sort(rng.integers(0, size, new_size))


def special_masks(height: int, width: int) -> np.ndarray:
    """Masks whose runs wrap columns, touch every border, or change at every pixel."""
    masks = np.zeros((8, height, width), np.uint8)
    masks[0] = 1  # one run over every column
    masks[1, :, 2:5] = 1  # whole columns: one run wrapping three columns
    masks[2, -1, :] = 1  # last row: a one-pixel run per column
    masks[3, 0, 0] = masks[3, -1, -1] = 1  # first and last pixel
    masks[4] = (np.add.outer(np.arange(height), np.arange(width)) % 2).astype(np.uint8)
    masks[5] = np.random.default_rng(5).random((height, width)) < 0.3
    masks[6, height // 3 :, : width // 2] = 1  # bottom-left block: runs wrap columns
    return masks  # masks[7]: empty


@pytest.mark.parametrize(
    ("source", "resized", "padded", "n", "seed"),
    [
        ((97, 131), (160, 217), (160, 224), 12, 0),  # upscale, tight pad
        ((480, 640), (800, 1067), (1344, 1344), 20, 1),  # COCO at the official 800 / 1333
        ((333, 500), (96, 144), (128, 160), 15, 2),  # downscale
        ((64, 48), (64, 48), (64, 64), 10, 3),  # identity
        ((1, 300), (21, 37), (32, 64), 0, 4),  # one source row (special masks only)
    ],
)
def test_from_runs_equals_compute_targets_on_the_resized_masks(source, resized, padded, n, seed):
    """The runs path gives what `compute_targets` gives on the selected, mirrored, padded masks."""
    rng = np.random.default_rng(seed)
    boxes, classes, masks, is_crowd = random_instances(rng, *source, n)
    masks = np.concatenate([masks, special_masks(*source)])
    extra = len(masks) - n
    boxes = np.concatenate([boxes, np.tile([[0, 0, *source]], (extra, 1))]).astype(np.float32)
    classes = np.concatenate([classes, np.arange(extra, dtype=np.int32)])
    is_crowd = np.concatenate([is_crowd, np.zeros(extra, bool)])
    boxes *= np.tile(np.divide(resized, source), 2).astype(np.float32)  # at the resized size
    rows = random_index_map(rng, source[0], resized[0])
    cols = random_index_map(rng, source[1], resized[1])
    for flip in (False, True):
        dense = resized_padded(masks, rows, cols, flip, *padded)
        expected = {
            k: v.numpy() for k, v in compute_targets(boxes, classes, dense, is_crowd).items()
        }
        assert (expected["cell_instance"] >= 0).any()
        actual = from_runs(boxes, classes, masks, is_crowd, rows, cols, flip, *padded)
        assert_same(actual, expected)
        np.testing.assert_array_equal(actual["instance_area"], dense.sum(axis=(1, 2)))
        np.testing.assert_array_equal(actual["instance_area"], expected["instance_area"])


def test_resize_starts_inverts_the_index_map():
    """Source index r becomes resized indices [starts[r], starts[r + 1]): repeating each source
    index that many times gives the index map back, skipped indices included."""
    np.testing.assert_array_equal(resize_starts([0, 0, 1, 3, 3], 5), [0, 2, 3, 3, 5, 5])
    rng = np.random.default_rng(8)
    for size, new_size in [(97, 160), (333, 96), (1, 21), (64, 64)]:
        index = random_index_map(rng, size, new_size)
        starts = resize_starts(index, size).numpy()
        assert starts.shape == (size + 1,) and starts[0] == 0 and starts[-1] == new_size
        np.testing.assert_array_equal(np.repeat(np.arange(size), np.diff(starts)), index)


def test_batch_equals_each_image_alone():
    """`compute_targets_from_runs_batch` on images made from source images of different sizes
    (one without instances, one with crowd instances only), several images per source image
    (as SoloTargetGen's variants) with their own resize maps and flips, in any order, gives each
    image what `compute_targets_from_runs` gives it alone, bit for bit (graph mode, as
    SoloTargetGen)."""
    rng = np.random.default_rng(21)
    sources = []  # (boxes, classes, masks, is_crowd) at the source size
    for (height, width), n in [
        ((97, 131), 9),
        ((480, 640), 14),
        ((333, 500), 0),  # no instances
        ((64, 48), 5),
        ((1, 300), 0),  # special masks only
        ((240, 180), 4),  # crowd instances only
    ]:
        boxes, classes, masks, is_crowd = random_instances(rng, height, width, n)
        if height == 1:
            masks = special_masks(height, width)
            boxes = np.tile(np.float32([[0, 0, height, width]]), (len(masks), 1))
            classes, is_crowd = np.arange(len(masks), dtype=np.int32), np.zeros(len(masks), bool)
        if height == 240:
            is_crowd[:] = True
        sources.append((boxes.reshape(-1, 4), classes, masks, is_crowd))
    images = []  # (source, rows, cols, flip)
    for source, resized, flip in [
        (1, (800, 1067), True),
        (0, (160, 217), False),
        (1, (800, 1067), False),
        (2, (200, 300), False),
        (3, (64, 48), True),
        (1, (640, 853), True),
        (4, (21, 37), True),
        (0, (60, 81), True),
        (5, (300, 225), False),
        (3, (96, 72), False),
    ]:
        height, width = sources[source][2].shape[1:]
        rows = random_index_map(rng, height, resized[0])
        cols = random_index_map(rng, width, resized[1])
        images.append((source, rows, cols, flip))
    padded = (1344, 1344)

    def image_boxes(source, cols, flip):  # any boxes do: the source's, mirrored with the flip
        boxes = sources[source][0].copy()
        if flip:
            boxes[:, [1, 3]] = len(cols) - boxes[:, [3, 1]]
        return boxes

    def starts(index, size):
        return np.searchsorted(index, np.arange(size + 1)).astype(np.int32)

    def batch_fn(row_starts):
        return tf.function(compute_targets_from_runs_batch)(
            np.concatenate([image_boxes(s, cols, flip) for s, _, cols, flip in images]),
            np.concatenate([sources[s][1] for s, *_ in images]),
            tf.concat([mask_runs(masks) for _, _, masks, _ in sources], axis=0),
            np.concatenate([sources[s][3] for s, *_ in images]),
            mask_splits=np.cumsum([0] + [len(classes) for _, classes, *_ in sources]),
            source_height=[masks.shape[1] for _, _, masks, _ in sources],
            source_width=[masks.shape[2] for _, _, masks, _ in sources],
            source_image=[s for s, *_ in images],
            row_starts=tf.ragged.constant(row_starts),
            col_starts=tf.ragged.constant(
                [starts(cols, sources[s][2].shape[2]) for s, _, cols, _ in images]
            ),
            flip=[flip for *_, flip in images],
            padded_height=padded[0],
            padded_width=padded[1],
        )

    rows = [starts(image_rows, sources[s][2].shape[1]) for s, image_rows, _, _ in images]
    # The geometry is checked image by image (the starts restart from 0 in the next image).
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-decreasing"):
        batch_fn(rows[:1] + [rows[1][::-1]] + rows[2:])
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-decreasing"):
        batch_fn(rows[:1] + [rows[1][1:]] + rows[2:])  # one start short
    batch = batch_fn(rows)
    assert batch["cell_class"].shape == (len(images), NUM_CELLS)
    positives = 0
    for j, (source, image_rows, image_cols, flip) in enumerate(images):
        _, classes, masks, is_crowd = sources[source]
        alone = _from_runs_graph(
            *(image_boxes(source, image_cols, flip), classes, mask_runs(masks), is_crowd),
            *(masks.shape[1:], image_rows, image_cols, flip, padded),
        )
        batched = targets_of_image(batch, j)
        assert sorted(batched) == sorted(alone)
        for name, value in alone.items():
            assert batched[name].dtype == value.dtype, name
            np.testing.assert_array_equal(batched[name], value, err_msg=f"image {j}: {name}")
        positives += int((alone["cell_instance"].numpy() >= 0).sum())
        if is_crowd.all():
            np.testing.assert_array_equal(batched["cell_class"], -1)
    assert positives > 0


def test_from_runs_matches_reference_on_boundary_instances():
    """Exact mid-image centres and scales on the range bounds, through identity index maps."""
    for height, width in [(256, 256), (800, 1216)]:
        boxes, classes, masks, is_crowd = boundary_instances(height, width)
        rows, cols = np.arange(height), np.arange(width)
        actual = from_runs(boxes, classes, masks, is_crowd, rows, cols, False, height, width)
        assert_same(actual, reference_targets(boxes, classes, masks, is_crowd))


def test_exact_division_when_the_pad_is_a_graph_constant():
    """With a fixed pad the padded size is a graph constant, and Grappler rewrites `x / constant`
    as `x * (1 / constant)`: `280 * (1 / 1344) // (1 / 24) == 4.0`, but the official
    `(280 / 1344) // (1 / 24) == 5.0`. Centre of mass exactly 280 (rows 180..380) and a 600 px
    high box, so the 3 x 3 clamp around the centre cell decides the region: rows 4..6 of the
    24-grid, not 3..5."""
    masks = np.zeros((1, 1344, 1344), np.uint8)
    masks[0, 180:381, 600:801] = 1
    boxes, classes, is_crowd = np.array([[0, 600, 600, 800]], np.float32), [3], [False]
    expected = reference_targets(boxes, np.array(classes), masks, is_crowd)
    level2 = expected["cell_instance"][LEVEL_OFFSETS[2] : LEVEL_OFFSETS[3]].reshape(24, 24)
    assert np.flatnonzero((level2 >= 0).any(axis=1)).tolist() == [4, 5, 6]

    rows = cols = np.arange(1344)
    constant_pad = tf.function(
        lambda runs: compute_targets_from_runs(
            boxes,
            classes,
            runs,
            is_crowd,
            source_height=1344,
            source_width=1344,
            source_rows=rows,
            source_cols=cols,
            flip=False,
            padded_height=1344,
            padded_width=1344,
        )
    )
    assert_same(
        with_unpacked_masks(constant_pad(mask_runs(masks)), 1344, 1344, (1344,) * 2), expected
    )
    static_shape = tf.function(
        compute_targets,
        input_signature=[
            tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, 1344, 1344], tf.uint8),
            tf.TensorSpec([None], tf.bool),
        ],
    )
    assert_same(static_shape(boxes, classes, masks, is_crowd), expected)


def test_from_runs_empty_image():
    out = compute_targets_from_runs(
        np.zeros((0, 4), np.float32),
        np.zeros((0,), np.int32),
        tf.RaggedTensor.from_row_lengths(np.zeros(0, np.int64), np.zeros(0, np.int64)),
        np.zeros((0,), bool),
        source_height=30,
        source_width=40,
        source_rows=np.arange(60) // 2,
        source_cols=np.arange(80) // 2,
        flip=True,
        padded_height=64,
        padded_width=96,
    )
    np.testing.assert_array_equal(out["cell_class"], np.full(NUM_CELLS, -1))
    assert with_unpacked_masks(out, 60, 80, (64, 96))["instance_masks"].shape == (0, 16, 24)


def test_from_runs_rejects_bad_geometry():
    masks = np.zeros((1, 10, 12), np.uint8)
    masks[0, 2:5, 3:9] = 1
    args = (np.array([[2, 3, 5, 9]], np.float32), [0], masks, [False])
    rows, cols = np.arange(10), np.arange(12)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of 32"):
        from_runs(*args, rows, cols, False, 32, 48)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-decreasing"):
        from_runs(*args, rows[::-1], cols, False, 32, 32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-decreasing"):
        from_runs(*args, rows, cols + 1, False, 32, 32)  # source column 12 does not exist
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-decreasing"):
        from_runs(*args, np.arange(40) // 4, cols, False, 32, 32)  # 40 rows do not fit in 32
    with pytest.raises(tf.errors.InvalidArgumentError, match="cover"):
        compute_targets_from_runs(
            *args[:2],
            tf.ragged.constant([[5, 3]], tf.int64),
            args[3],
            source_height=10,
            source_width=12,
            source_rows=rows,
            source_cols=cols,
            flip=False,
            padded_height=32,
            padded_width=32,
        )


def _coco_images():
    from pycocotools.coco import COCO

    for split in ("train2017", "val2017"):
        coco = COCO(str(COCO_TINY / f"annotations/instances_{split}.json"))
        class_index = {cat: i for i, cat in enumerate(sorted(coco.getCatIds()))}
        for img_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(img_id)[0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            yield info, anns, class_index, coco


def _resize_and_pad(info, anns, class_index, coco, short=800, long_cap=1333):
    """Official Resize (keep ratio, 800 / 1333) with nearest-neighbour masks, then Pad to 32.

    Returns the `compute_targets` inputs, then the original masks and the row / column maps.
    """
    h, w = info["height"], info["width"]
    scale = min(short / min(h, w), long_cap / max(h, w))
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    pad_h, pad_w = -(-new_h // 32) * 32, -(-new_w // 32) * 32
    rows = np.minimum((np.arange(new_h) + 0.5) * h / new_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(new_w) + 0.5) * w / new_w, w - 1).astype(np.int64)
    source = np.stack([coco.annToMask(ann) for ann in anns])
    masks = np.zeros((len(anns), pad_h, pad_w), np.uint8)
    masks[:, :new_h, :new_w] = source[:, rows][:, :, cols]
    boxes = np.zeros((len(anns), 4), np.float32)
    for i, ann in enumerate(anns):
        x, y, bw, bh = ann["bbox"]
        sy, sx = new_h / h, new_w / w
        boxes[i] = [y * sy, x * sx, (y + bh) * sy, (x + bw) * sx]
    classes = np.array([class_index[a["category_id"]] for a in anns], np.int32)
    is_crowd = np.array([a["iscrowd"] for a in anns], bool)
    return (boxes, classes, masks, is_crowd), source, rows, cols


@pytest.mark.skipif(
    not (COCO_TINY / "annotations").is_dir(), reason=f"coco_tiny data not found at {COCO_TINY}"
)
def test_matches_reference_on_every_coco_tiny_image():
    """All 160 real images at the official 800 / 1333 size (polygons, multi-polygons, crowd RLE),
    from the resized masks (`compute_targets`) and from the original masks' runs plus the
    resize's index maps (`compute_targets_from_runs`)."""
    targets_fn = tf.function(
        compute_targets,
        input_signature=[
            tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None, None], tf.uint8),
            tf.TensorSpec([None], tf.bool),
        ],
    )
    checked, crowd, positives = 0, 0, 0
    for info, anns, class_index, coco in _coco_images():
        inputs, source, rows, cols = _resize_and_pad(info, anns, class_index, coco)
        expected = reference_targets(*inputs)
        pad_h, pad_w = inputs[2].shape[1:]
        boxes, classes, _, is_crowd = inputs
        try:
            assert_same(targets_fn(*inputs), expected)
            runs = from_runs(
                boxes, classes, source, is_crowd, rows, cols, False, pad_h, pad_w, graph=True
            )
            assert_same(runs, expected)
        except AssertionError as error:
            raise AssertionError(f"image {info['id']} ({info['file_name']})") from error
        checked += 1
        crowd += int(inputs[3].sum())
        positives += int((expected["cell_instance"] >= 0).sum())
    assert checked == 160
    assert crowd > 0 and positives > 0
