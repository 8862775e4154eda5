"""SOLOv2 grid targets for one image, as vectorized TF ops.

The same function runs in the SoloTargetGen Beam component (eager or inside `tf.function`) and
inside a `tf.data` map in the trainer: no Python loop over instances, cells or levels (all levels
are handled at once over the flat cell axis), and fixed-shape outputs (`[NUM_CELLS]`,
`[N, H/4, W/4]`).

Algorithm: the official SOLOv2 assignment (WXinlong/SOLO `solov2_head.py::solov2_target_single`),
see `docs/CONTRACT.md` for the output layout. Departures are listed in `compute_targets`.
"""

import tensorflow as tf

GRIDS = (40, 36, 24, 16, 12)
SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
SIGMA = 0.2
# Instance masks live at the resolution of the mask feature branch: 1/4 of the padded input.
MASK_STRIDE = 4


def level_offsets(grids: tuple[int, ...] = GRIDS) -> tuple[int, ...]:
    """Flat index of the first cell of each level: `(0, 1600, 2896, 3472, 3728)` by default."""
    offsets, total = [], 0
    for s in grids:
        offsets.append(total)
        total += s * s
    return tuple(offsets)


def num_cells(grids: tuple[int, ...] = GRIDS) -> int:
    """Total number of grid cells over all levels: 3872 by default."""
    return sum(s * s for s in grids)


LEVEL_OFFSETS = level_offsets(GRIDS)
NUM_CELLS = num_cells(GRIDS)


def target_shapes(
    padded_height: int, padded_width: int, grids: tuple[int, ...] = GRIDS
) -> dict[str, tuple]:
    """Per-image target shapes (N = number of instances, `None` here) for a padded input size."""
    if padded_height % MASK_STRIDE or padded_width % MASK_STRIDE:
        raise ValueError(
            f"padded size {padded_height}x{padded_width} is not a multiple of {MASK_STRIDE}"
        )
    cells = num_cells(grids)
    return {
        "cell_class": (cells,),
        "cell_instance": (cells,),
        "instance_masks": (None, padded_height // MASK_STRIDE, padded_width // MASK_STRIDE),
        "instance_num_cells": (None,),
    }


def _python_floordiv(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Python's float `x // y` for float64 `x` and `y > 0`, bit for bit (CPython float_floor_div).

    The official code computes cells as `(c / size) // (1. / S)`, which is not `floor(c / size * S)`
    at exact boundaries because `1. / S` is inexact: `0.5 // (1. / 40) == 19.0`. A mask whose centre
    of mass is exactly mid-image lands in cell 19 of the 40-grid, as in the official code.
    """
    mod = tf.truncatemod(x, y)  # C fmod: exact, sign of x
    div = (x - mod) / y
    div = tf.where(mod < 0.0, div - 1.0, div)  # y > 0: fmod took the sign of a negative x
    floordiv = tf.floor(div)
    return tf.where(div - floordiv > 0.5, floordiv + 1.0, floordiv)


def _packed(masks_uint8: tf.Tensor, shape: list) -> tf.Tensor:
    """Reshape to `shape + [4]` and view each run of 4 pixels as one int32 word (no copy).

    Adding words adds the 4 byte lanes independently as long as no lane exceeds 255, and viewing
    the sum as bytes again gives the lane sums in the original pixel order on any byte order.
    On {0,1} masks this does 4 pixel additions per int32 addition and never widens the
    full-resolution masks to 4 bytes per pixel (the dominant cost otherwise).
    """
    return tf.bitcast(tf.reshape(masks_uint8, shape + [4]), tf.int32)


def _mask_moments(masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Pixel count and row / column index sums of `[N, H, W]` {0,1} uint8 masks, float64 `[N]`.

    Partial sums over 32 pixels stay in uint8 lanes (at most 32); the rest is exact integer
    arithmetic held in float64 (every value is far below 2**53). H, W multiples of 32.
    """
    n, h, w = tf.shape(masks)[0], tf.shape(masks)[1], tf.shape(masks)[2]
    row_counts = tf.reduce_sum(tf.reshape(masks, [n, h, w // 32, 32]), axis=3)  # uint8
    row_counts = tf.reduce_sum(tf.cast(row_counts, tf.float64), axis=2)  # [N, H]
    col_words = tf.reduce_sum(_packed(masks, [n, h // 32, 32, w // 4]), axis=2)
    col_counts = tf.reshape(tf.bitcast(col_words, tf.uint8), [n, h // 32, w])
    col_counts = tf.reduce_sum(tf.cast(col_counts, tf.float64), axis=1)  # [N, W]
    area = tf.reduce_sum(row_counts, axis=1)
    row_sum = tf.linalg.matvec(row_counts, tf.range(tf.cast(h, tf.float64), dtype=tf.float64))
    col_sum = tf.linalg.matvec(col_counts, tf.range(tf.cast(w, tf.float64), dtype=tf.float64))
    return area, row_sum, col_sum


def downsample_masks(masks: tf.Tensor) -> tf.Tensor:
    """`[N, H, W]` {0,1} masks -> `[N, H/4, W/4]` uint8, as the official `mmcv.imrescale(m, 0.25)`.

    cv2's bilinear resize (INTER_LINEAR, half-pixel centres) at scale 1/4 samples source position
    4d + 1.5 in each axis, i.e. weights 1/2 on pixels 4d+1 and 4d+2: each output is the mean of a
    2x2 block of {0,1} values, rounded half up by cv2's fixed-point cast back to uint8. So a pixel
    is on iff at least 2 of its 4 sampled pixels are on. This equals
    `tf.image.resize(m, [H/4, W/4], "bilinear", antialias=False) >= 0.5` (same sampling positions,
    pinned by a test) but reads the masks as packed int32 words, about 5x faster on CPU.
    H and W must be multiples of 4.
    """
    masks = tf.cast(masks, tf.uint8)
    n, h, w = tf.shape(masks)[0], tf.shape(masks)[1], tf.shape(masks)[2]
    words = _packed(masks, [n, h // 4, 4, w // 4])  # word [d, k, e] = row 4d+k, cols 4e..4e+3
    rows = tf.bitcast(words[:, :, 1] + words[:, :, 2], tf.uint8)  # [N, H/4, W/4, 4], lanes <= 2
    return tf.cast(rows[..., 1] + rows[..., 2] >= 2, tf.uint8)


def compute_targets(
    boxes: tf.Tensor,
    classes: tf.Tensor,
    masks: tf.Tensor,
    is_crowd: tf.Tensor,
    *,
    grids: tuple[int, ...] = GRIDS,
    scale_ranges: tuple[tuple[float, float], ...] = SCALE_RANGES,
    sigma: float = SIGMA,
) -> dict[str, tf.Tensor]:
    """SOLOv2 category / instance grid targets of one padded image.

    All inputs are at the padded input resolution (after resize and bottom/right zero padding;
    H and W multiples of 32, the contract's padded size):

    Args:
      boxes: `[N, 4]` float32 `[ymin, xmin, ymax, xmax]` in pixels; box height = ymax - ymin,
        width = xmax - xmin. Only the box size is used (object scale and centre-region size).
      classes: `[N]` int contiguous class index in `[0, C)`.
      masks: `[N, H, W]` uint8 (or bool) full-resolution instance masks with values in {0, 1}
        (other values break the packed pixel sums: binarise upstream).
      is_crowd: `[N]` bool or int; crowd instances are never positives.
      grids, scale_ranges, sigma: per-level grid sizes, `(lower, upper)` object scale ranges in
        pixels (inclusive), and the centre-region scale; official SOLOv2 defaults.

    Returns:
      dict with
        `cell_class` `[sum(S^2)]` int32: class index per cell, -1 for background,
        `cell_instance` `[sum(S^2)]` int32: index into `instance_masks`, -1 for background,
        `instance_masks` `[N, H/4, W/4]` uint8 in {0, 1}: every input instance, downsampled,
        `instance_num_cells` `[N]` int32: positive cells each instance holds in the final grids
          (over all levels, after collisions); 0 flags a degenerate instance (crowd, empty mask,
          scale outside every range, or overwritten everywhere by later instances).
      Cells are concatenated level by level, row-major inside a level (`LEVEL_OFFSETS`).

    Assignment (official, per instance and level):
      scale = sqrt(box_w * box_h); the instance belongs to every level with
      lower <= scale <= upper (ranges overlap: most objects sit on two levels). Instances with an
      empty mask are skipped. The centre (cy, cx) is the mask's centre of mass on the padded
      full-resolution mask. With size = padded size (= 4 x mask feature size), the centre cell is
      `(cy / H) // (1 / S)`, the centre region is `cy -/+ 0.5 * box_h * sigma` (same in x) mapped
      to cells the same way and clamped to [0, S-1], then to the 3x3 neighbourhood of the centre
      cell; every cell of the region is positive. Instances are written in annotation order,
      so a later instance overwrites an earlier one on a shared cell.

    Departures from the official code:
      * Collisions: the official mask targets keep one entry per (instance, cell) pair, so a cell
        hit by two instances yields one kernel trained towards two masks, while its category
        target is the later instance. Our compact format stores one instance per cell, so the
        later instance wins the mask target too, consistent with the category target.
      * Rounding: object scale and half-extents are float32 as in the official code, and the
        centre cell is its float64 numpy computation (bit-identical, Python `//` semantics). The
        official region edges `(c -/+ half) / size // (1. / S)` are then evaluated by torch in
        float32 (version-dependent floor division); ours stay in float64 with Python `//`, so an
        edge can differ only when it falls within float32 rounding of a cell boundary.
      * Box width is `xmax - xmin`. The official mmdet-v1 loader stores `x2 = x + w - 1` (COCO
        `[x, y, w, h]`) before resizing, i.e. boxes one original pixel smaller; whoever builds
        `boxes` decides which convention to feed (this function does not subtract anything).
      * Degenerate boxes (zero or negative size) have scale 0 or NaN, outside every range, so they
        get no cell, as in the official code.
    """
    if len(grids) != len(scale_ranges):
        raise ValueError(f"{len(grids)} grids but {len(scale_ranges)} scale ranges")
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    classes = tf.cast(classes, tf.int32)
    masks = tf.cast(masks, tf.uint8)
    is_crowd = tf.cast(is_crowd, tf.bool)
    height, width = tf.shape(masks)[1], tf.shape(masks)[2]
    tf.debugging.assert_equal(
        (height % 32, width % 32), (0, 0), message="masks must be padded to multiples of 32"
    )

    area, row_sum, col_sum = _mask_moments(masks)
    nonempty = area > 0
    safe_area = tf.where(nonempty, area, 1.0)
    # scipy.ndimage.center_of_mass: exact integer sums, one correctly rounded float64 division.
    center_y, center_x = row_sum / safe_area, col_sum / safe_area
    rel_y = center_y / tf.cast(height, tf.float64)
    rel_x = center_x / tf.cast(width, tf.float64)

    # Scale and half-extents in float32, operation for operation as the official torch code.
    box_h = boxes[:, 2] - boxes[:, 0]
    box_w = boxes[:, 3] - boxes[:, 1]
    scale = tf.cast(tf.sqrt(box_h * box_w), tf.float64)
    half_h = tf.cast(0.5 * box_h * sigma, tf.float64)
    half_w = tf.cast(0.5 * box_w * sigma, tf.float64)
    top_rel = (center_y - half_h) / tf.cast(height, tf.float64)
    down_rel = (center_y + half_h) / tf.cast(height, tf.float64)
    left_rel = (center_x - half_w) / tf.cast(width, tf.float64)
    right_rel = (center_x + half_w) / tf.cast(width, tf.float64)
    candidate = nonempty & tf.logical_not(is_crowd)

    # Every level at once: per-(instance, level) quantities are [N, L].
    num_grid = tf.constant(grids, tf.int32)
    inv_grid = tf.constant([1.0 / s for s in grids], tf.float64)  # the official `1. / num_grid`
    lower = tf.constant([r[0] for r in scale_ranges], tf.float64)
    upper = tf.constant([r[1] for r in scale_ranges], tf.float64)

    def grid_index(rel):  # official `int(rel // (1. / num_grid))`, [N] -> [N, L]
        cell = _python_floordiv(rel[:, tf.newaxis], inv_grid)
        # Only the [0, S-1] range survives the clamps below; clipping keeps the int cast defined.
        return tf.cast(tf.clip_by_value(cell, -1.0, float(max(grids))), tf.int32)

    coord_h, coord_w = grid_index(rel_y), grid_index(rel_x)
    top = tf.maximum(tf.maximum(grid_index(top_rel), 0), coord_h - 1)
    down = tf.minimum(tf.minimum(grid_index(down_rel), num_grid - 1), coord_h + 1)
    left = tf.maximum(tf.maximum(grid_index(left_rel), 0), coord_w - 1)
    right = tf.minimum(tf.minimum(grid_index(right_rel), num_grid - 1), coord_w + 1)
    scale = scale[:, tf.newaxis]
    hit = candidate[:, tf.newaxis] & (scale >= lower) & (scale <= upper)  # NaN compares False

    # The region spans at most 3x3 cells from (top, left): enumerate the 9 candidates per
    # (instance, level), O(N) work instead of testing every instance against every cell.
    offset_h = tf.constant([0, 0, 0, 1, 1, 1, 2, 2, 2], tf.int32)
    offset_w = tf.constant([0, 1, 2, 0, 1, 2, 0, 1, 2], tf.int32)
    rows = top[..., tf.newaxis] + offset_h  # [N, L, 9]
    cols = left[..., tf.newaxis] + offset_w
    valid = (
        hit[..., tf.newaxis] & (rows <= down[..., tf.newaxis]) & (cols <= right[..., tf.newaxis])
    )
    level_offset = tf.constant(level_offsets(grids), tf.int32)[:, tf.newaxis]
    flat = level_offset + rows * num_grid[:, tf.newaxis] + cols
    num_instances = tf.shape(boxes)[0]
    ids = tf.broadcast_to(tf.range(num_instances)[:, tf.newaxis, tf.newaxis], tf.shape(flat))
    # Annotation order is the official write order: the highest instance index on a cell wins.
    # Segment -1 (not a positive) is dropped; empty cells get INT_MIN, clamped to background.
    cell_instance = tf.math.unsorted_segment_max(ids, tf.where(valid, flat, -1), num_cells(grids))
    cell_instance = tf.maximum(cell_instance, -1)
    # Slot 0 is background, so the lookup also works with N = 0.
    cell_class = tf.gather(tf.concat([[-1], classes], axis=0), cell_instance + 1)
    # Background cells carry id -1, which unsorted_segment_sum drops.
    instance_num_cells = tf.math.unsorted_segment_sum(
        tf.ones_like(cell_instance), cell_instance, num_instances
    )
    return {
        "cell_class": cell_class,
        "cell_instance": cell_instance,
        "instance_masks": downsample_masks(masks),
        "instance_num_cells": instance_num_cells,
    }


__all__ = [
    "GRIDS",
    "LEVEL_OFFSETS",
    "MASK_STRIDE",
    "NUM_CELLS",
    "SCALE_RANGES",
    "SIGMA",
    "compute_targets",
    "downsample_masks",
    "level_offsets",
    "num_cells",
    "target_shapes",
]
