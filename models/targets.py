"""SOLOv2 grid targets of an image (or a batch of images), as vectorized TF ops.

Two entry points compute the same targets from two forms of the same masks:

* `compute_targets`: full-resolution masks at the padded input size, `[N, H, W]`. This is the
  definition, checked exactly against a per-instance loop port of the official code.
* `compute_targets_from_runs`: masks as COCO run lengths at their original size, plus the
  nearest-neighbour resize (a source row and column per resized pixel), flip and pad that
  take them to the padded input. It never builds a full-resolution mask: every run is a
  rectangle of the resized mask, and the mass centre and the 1/4-scale masks are computed
  from those rectangles, in time proportional to the runs and the masks' area at 1/4 scale.
  Its 1/4-scale masks come bit-packed and cropped to the resized image (`unpack_masks`
  restores them). Tests check it equals `compute_targets` on the resized masks, bit for bit.
  `compute_targets_from_runs_batch` is the same for J images in one call, so that the graph's
  fixed cost (some hundreds of small ops) is paid once per batch: SoloTargetGen uses it
  (`benchmarks/targets.py` measures both); `compute_targets_from_runs` is its batch of one.
  Its images are made from source images (several per source: SoloTargetGen's scale and flip
  variants), and what does not depend on the resize or the flip, the runs' rectangles, is
  computed once per source image.

All are plain TF ops (eager, `tf.function` or `tf.data`): no Python loop over images, instances,
cells or levels (all levels are handled at once over the flat cell axis), and fixed-shape outputs
(`[NUM_CELLS]`, `[N, H/4, W/4]`, or packed `[N, ceil(h/4), ceil(w/32)]` from runs).

Algorithm: the official SOLOv2 assignment (WXinlong/SOLO `solov2_head.py::solov2_target_single`),
see `docs/CONTRACT.md` for the output layout. Departures are listed in `compute_targets`.
"""

import sys

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


def _row_ids(row_splits: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """The row (int32) of each of `size` flat values of a ragged tensor with these `row_splits`.

    Value k is in row `#{j >= 1: row_splits[j] <= k}`: rows are counted where they start, then
    summed (linear time, faster than a binary search per value or `value_rowids`).
    """
    starts = row_splits[1:-1]
    counts = tf.math.unsorted_segment_sum(tf.ones_like(starts, tf.int32), starts, size + 1)
    return tf.cumsum(counts[:-1])


def _gather_where(condition: tf.Tensor, *tensors: tf.Tensor) -> list[tf.Tensor]:
    """`tf.boolean_mask` of several tensors with one index computation (a graph of few ops)."""
    index = tf.where(condition)[:, 0]
    return [tf.gather(t, index) for t in tensors]


def _assign_cells(
    boxes: tf.Tensor,
    classes: tf.Tensor,
    is_crowd: tf.Tensor,
    area: tf.Tensor,
    row_sum: tf.Tensor,
    col_sum: tf.Tensor,
    instance_splits: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    grids: tuple[int, ...],
    scale_ranges: tuple[tuple[float, float], ...],
    sigma: float,
) -> dict[str, tf.Tensor]:
    """The grid assignment of `compute_targets`, from the mask moments, for J images at once.

    boxes `[N, 4]` float32, classes `[N]` int32, is_crowd `[N]` bool; area, row_sum, col_sum
    `[N]` float64: pixel count and row / column index sums of each mask at the padded
    `height` x `width` (int32 scalars, the same for every image), exact integers. The N instances
    are those of J images, image by image: image j holds instances `[instance_splits[j],
    instance_splits[j + 1])` (`instance_splits` `[J + 1]` int32, ascending from 0), in annotation
    order. Returns `cell_class`, `cell_instance` `[J, sum(S^2)]` int32 (`cell_instance` indexes
    the image's own instances, from 0) and `instance_num_cells`, `instance_area` `[N]` int32.
    """
    nonempty = area > 0
    safe_area = tf.where(nonempty, area, 1.0)
    # scipy.ndimage.center_of_mass: exact integer sums, one correctly rounded float64 division.
    # y and x are stacked ([2, N]), so each step below is one op for both axes.
    center = tf.stack([row_sum, col_sum]) / safe_area

    # Scale and half-extents in float32, operation for operation as the official torch code.
    box_h = boxes[:, 2] - boxes[:, 0]
    box_w = boxes[:, 3] - boxes[:, 1]
    scale = tf.cast(tf.sqrt(box_h * box_w), tf.float64)
    half = tf.cast(0.5 * tf.stack([box_h, box_w]) * sigma, tf.float64)
    size = tf.cast(tf.stack([height, width]), tf.float64)[:, tf.newaxis]
    # Centre, region start and region end, relative to the padded size: [3, 2, N]. Not `/`: when
    # the size is a graph constant (a fixed pad), Grappler turns `x / size` into
    # `x * (1 / size)`, which is not the correctly rounded quotient of the official code and
    # moves centres lying exactly on a cell boundary. DivNoNan is never rewritten (size > 0).
    rel = tf.math.divide_no_nan(tf.stack([center, center - half, center + half]), size)
    candidate = nonempty & tf.logical_not(is_crowd)

    # Every level at once: per-(instance, level) quantities are [N, L].
    num_grid = tf.constant(grids, tf.int32)
    inv_grid = tf.constant([1.0 / s for s in grids], tf.float64)  # the official `1. / num_grid`
    lower = tf.constant([r[0] for r in scale_ranges], tf.float64)
    upper = tf.constant([r[1] for r in scale_ranges], tf.float64)

    # Official `int(rel // (1. / num_grid))`, [3, 2, N] -> [3, 2, N, L]. Only the [0, S-1] range
    # survives the clamps below; clipping keeps the int cast defined.
    cell = _python_floordiv(rel[..., tf.newaxis], inv_grid)
    cell = tf.cast(tf.clip_by_value(cell, -1.0, float(max(grids))), tf.int32)
    coord = cell[0]  # centre cell, [2, N, L] (y, x)
    start = tf.maximum(tf.maximum(cell[1], 0), coord - 1)  # region, clamped to 3 x 3
    end = tf.minimum(tf.minimum(cell[2], num_grid - 1), coord + 1)
    top, left, down, right = start[0], start[1], end[0], end[1]
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
    # Cell c of image j is segment j * cells + c.
    cells = num_cells(grids)
    num_instances = tf.shape(boxes)[0]
    num_images = tf.size(instance_splits) - 1
    image = _row_ids(instance_splits, num_instances)[:, tf.newaxis, tf.newaxis]
    level_offset = tf.constant(level_offsets(grids), tf.int32)[:, tf.newaxis]
    flat = image * cells + level_offset + rows * num_grid[:, tf.newaxis] + cols
    ids = tf.broadcast_to(tf.range(num_instances)[:, tf.newaxis, tf.newaxis], tf.shape(flat))
    # Annotation order is the official write order: the highest instance index on a cell wins
    # (instances are numbered image by image, so the order inside an image is kept).
    # Segment -1 (not a positive) is dropped; empty cells get INT_MIN, clamped to background.
    winner = tf.math.unsorted_segment_max(ids, tf.where(valid, flat, -1), num_images * cells)
    winner = tf.reshape(tf.maximum(winner, -1), [num_images, cells])
    # Slot 0 is background, so the lookup also works with N = 0.
    cell_class = tf.gather(tf.concat([[-1], classes], axis=0), winner + 1)
    cell_instance = tf.where(winner >= 0, winner - instance_splits[:-1, tf.newaxis], -1)
    # Background cells carry id -1, which unsorted_segment_sum drops.
    instance_num_cells = tf.math.unsorted_segment_sum(tf.ones_like(winner), winner, num_instances)
    return {
        "cell_class": cell_class,
        "cell_instance": cell_instance,
        "instance_num_cells": instance_num_cells,
        "instance_area": tf.cast(area, tf.int32),
    }


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
          scale outside every range, or overwritten everywhere by later instances),
        `instance_area` `[N]` int32: pixels of each mask at H x W (0: empty at this size).
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
    one_image = tf.stack([0, tf.shape(masks)[0]])
    targets = _assign_cells(
        *(boxes, classes, is_crowd, area, row_sum, col_sum, one_image, height, width),
        *(grids, scale_ranges, sigma),
    )
    targets["cell_class"] = targets["cell_class"][0]
    targets["cell_instance"] = targets["cell_instance"][0]
    targets["instance_masks"] = downsample_masks(masks)
    return targets


# --------------------------------------------------------------------------------------------
# The same targets from run lengths at the original size (SoloTargetGen)


def _run_rectangles(runs: tf.RaggedTensor, source_height: tf.Tensor) -> list[tf.Tensor]:
    """Foreground runs of column-major run lengths -> disjoint rectangles of source pixels.

    runs: `[N, (M)]` run lengths of `[H0, W0]` masks (COCO uncompressed RLE: flat pixel index
    `column * H0 + row`, alternating background / foreground runs, background first), with H0
    the mask's `source_height` (`[N]` int64, one per mask). A run may wrap over columns, so it
    is cut into one piece per column; then pieces with the same rows in adjacent columns are
    joined (masks often have the same rows over a few columns: about 1 in 4 on COCO, and
    every whole column of a wrapping run). Returns `[instance, row0, row1, col0, col1]`, each
    `[R]` int64, rows and columns half-open, instance by instance (`instance` non-decreasing),
    then, per instance `[N]` int64, the pixels its runs cover (H0 * W0 when valid) and its
    foreground pixels.
    """
    lengths = tf.cast(runs.flat_values, tf.int64)
    splits = tf.cast(runs.row_splits, tf.int64)
    num_instances = tf.size(splits, out_type=tf.int64) - 1
    instance = _row_ids(splits, tf.size(lengths, out_type=tf.int64))
    covered = tf.math.unsorted_segment_sum(lengths, instance, num_instances)
    first_run = tf.gather(splits, instance)
    begin = tf.cumsum(lengths, exclusive=True)
    begin -= tf.gather(begin, first_run)  # offsets within the instance's mask
    index = tf.range(tf.size(lengths, out_type=tf.int64)) - first_run  # within the instance
    foreground = tf.equal(tf.bitwise.bitwise_and(index, 1), 1)  # odd runs
    instance, begin, lengths = _gather_where(foreground & (lengths > 0), instance, begin, lengths)
    area = tf.math.unsorted_segment_sum(lengths, instance, num_instances)
    height = tf.gather(source_height, instance)
    end = begin + lengths
    # One piece per column of each run: rows [row0, row1) of column col0.
    columns = tf.ragged.range(begin // height, (end - 1) // height + 1)
    col0 = columns.flat_values
    run = _row_ids(columns.row_splits, tf.size(col0, out_type=tf.int64))
    instance, begin, end, height = (tf.gather(v, run) for v in (instance, begin, end, height))
    column_start = col0 * height
    row0 = tf.maximum(begin - column_start, 0)
    row1 = tf.minimum(end - column_start, height)
    # A piece with the rows of the one before, in the next column, extends it.
    extends = (
        tf.equal(instance[1:], instance[:-1])
        & tf.equal(row0[1:], row0[:-1])
        & tf.equal(row1[1:], row1[:-1])
        & tf.equal(col0[1:], col0[:-1] + 1)
    )
    new = tf.concat([tf.ones_like(instance[:1], tf.bool), tf.logical_not(extends)], 0)
    merged = tf.cumsum(tf.cast(new, tf.int64)) - 1  # the rectangle of each piece
    col1 = tf.math.unsorted_segment_max(col0, merged, tf.reduce_sum(tf.cast(new, tf.int64))) + 1
    rectangles = _gather_where(new, instance, row0, row1, col0) + [col1]
    return rectangles, covered, area


def _sample_ranges(lo: tf.Tensor, hi: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Pixel ranges `[lo, hi)` `[R]` (`0 <= lo <= hi`) on one axis -> the 1/4-scale indices
    that hold one or two of their samples.

    Index d of `downsample_masks` samples pixels 4d+1 and 4d+2. `[lo, hi)` holds pixel 4d+1 for
    d in `[a(lo), a(hi))` and 4d+2 for d in `[b(lo), b(hi))`, with a(x) = (x + 2) // 4 and
    b(x) = (x + 1) // 4 (so b <= a <= b + 1). Returns `start, end, both_start, both_end`, `[R]`
    each: d holds a sample iff `start <= d < end`, both iff `both_start <= d < both_end`
    (`start, end = b(lo), a(hi)`, empty when `lo == hi`; `both = [a(lo), b(hi))`). So at most
    the first and the last index of `[start, end)` hold one sample only.
    """

    def quarter(x):  # x // 4 for x >= 0 (integer division is slow elementwise)
        return tf.bitwise.right_shift(x, 2)

    start = quarter(lo + 1)
    end = tf.where(hi > lo, quarter(hi + 2), start)
    return start, end, quarter(lo + 2), quarter(hi + 1)


# Bits of the 8 {0,1} bytes of a uint64 word, first byte in memory to the most significant bit
# (`np.packbits` order): the top byte of `word * magic`. Each byte i lands on bit 7 - i of the
# top byte and no other product reaches it or carries into it (a test checks all 256 patterns).
_PACK_MAGIC = 0x8040201008040201 if sys.byteorder == "little" else 0x0102040810204080
_TOP_BYTE = 7 if sys.byteorder == "little" else 0  # of a uint64 seen as 8 uint8 in memory
# Row b: the 8 bits of byte b, most significant first.
_UNPACKED_BYTES = [[(b >> (7 - i)) & 1 for i in range(8)] for b in range(256)]


def _pack_bits(bits: tf.Tensor) -> tf.Tensor:
    """`[..., 8]` uint8 in {0, 1} -> `[...]` uint8, `np.packbits` along the last axis."""
    words = tf.bitcast(bits, tf.uint64) * tf.constant(_PACK_MAGIC, tf.uint64)
    return tf.bitcast(words, tf.uint8)[..., _TOP_BYTE]


def unpack_masks(packed: tf.Tensor, height, width) -> tf.Tensor:
    """Packed 1/4-scale masks `[N, h, B]` uint8 -> `[N, height, width]` uint8 in {0, 1}.

    The inverse of the `packed_masks` of `compute_targets_from_runs`: bit 7 - i of byte b of a
    row is pixel 8b + i (`np.unpackbits` order); the `h` rows and `8 B` columns are the top-left
    corner, the rest is zero padding. Needs `h <= height` and `8 B <= width`.
    """
    packed = tf.convert_to_tensor(packed, tf.uint8)
    n, rows, row_bytes = tf.shape(packed)[0], tf.shape(packed)[1], tf.shape(packed)[2]
    bits = tf.gather(tf.constant(_UNPACKED_BYTES, tf.uint8), tf.cast(packed, tf.int32))
    bits = tf.reshape(bits, [n, rows, 8 * row_bytes])
    return tf.pad(bits, [[0, 0], [0, height - rows], [0, width - 8 * row_bytes]])


def _downsample_rectangles(
    instance: tf.Tensor,
    y0: tf.Tensor,
    y1: tf.Tensor,
    x0: tf.Tensor,
    x1: tf.Tensor,
    out_height: tf.Tensor,
    out_width: tf.Tensor,
) -> tf.Tensor:
    """`downsample_masks` of masks given as disjoint rectangles, bit-packed along rows.

    Inputs `[R]` int32: instance index and half-open row / column ranges of each rectangle at the
    full resolution; out_height, out_width `[N]` int32: each instance's output size at 1/4 scale
    (out_width a multiple of 8), holding its rectangles. Returns the N packed masks end to end,
    flat uint8 `[sum(out_height * out_width) / 8]`: instance i's `[out_height[i], out_width[i] / 8]`
    bytes (see `unpack_masks`) follow those of instances 0 .. i - 1.

    Output pixel (d, e) is on iff at least 2 of its 4 samples are on. A rectangle holds samples
    of the pixels of a range of rows times a range of columns (`_sample_ranges`): both row
    samples inside its rows but the first and last row, likewise for columns, so it holds 2 or
    4 samples of each pixel but the (up to 4) corners, which get 1. The rectangles are disjoint,
    so every sample is counted once: a pixel is on iff a rectangle holds 2 of its samples, or
    two rectangles hold one each. Rectangles are walked column by column (work ~ the masks'
    area at 1/4 scale); the corners are few, and sorted to find those that meet. Pixels are set
    in each instance's bounding box (whole bytes), which is packed, then placed in the output:
    the masks cover a small part of the output, which is only written packed.
    """
    y_start, y_end, y_both, y_both_end = _sample_ranges(y0, y1)
    x_start, x_end, x_both, x_both_end = _sample_ranges(x0, x1)
    # Each instance's box: rows [box_y0, box_y1), bytes [box_b0, box_b1) (columns 8 b ...),
    # empty (both bounds at the output's end) for an instance without rectangles.
    num_instances = tf.size(out_height)

    def box(low, high, size):
        start = tf.minimum(tf.math.unsorted_segment_min(low, instance, num_instances), size)
        end = tf.math.unsorted_segment_max(high, instance, num_instances)
        return start, tf.maximum(end, start)

    box_y0, box_y1 = box(y_start, y_end, out_height)
    box_b0, box_b1 = box(
        tf.bitwise.right_shift(x_start, 3), tf.bitwise.right_shift(x_end + 7, 3), out_width // 8
    )
    box_height, box_bytes = box_y1 - box_y0, box_b1 - box_b0
    box_pixels = box_height * box_bytes * 8
    # Index of pixel (d, e) of instance i in the boxes: origin[i] + d * 8 box_bytes[i] + e.
    origin = tf.cumsum(box_pixels, exclusive=True) - (box_y0 * box_bytes + box_b0) * 8
    stride = tf.gather(box_bytes * 8, instance)
    top = tf.gather(origin, instance) + y_start * stride  # [R], pixel (y_start, 0)
    bottom = top + (y_end - y_start) * stride
    # The first / last row holds one row sample (when the rectangle holds any pixel).
    top_corner = tf.where((y_start < y_both) & (y_end > y_start), stride, 0)
    bottom_corner = tf.where((y_both_end < y_end) & (y_end > y_start), stride, 0)

    columns = tf.ragged.range(x_start, x_end)
    column = columns.flat_values  # [C]: the columns of every rectangle
    rectangle = _row_ids(columns.row_splits, tf.size(column, out_type=tf.int64))
    # In a column holding one column sample, the corners hold one sample in all.
    edge = (column < tf.gather(x_both, rectangle)) | (column >= tf.gather(x_both_end, rectangle))
    top, bottom = tf.gather(top, rectangle) + column, tf.gather(bottom, rectangle) + column
    top_corner = tf.where(edge, tf.gather(top_corner, rectangle), 0)
    bottom_corner = tf.where(edge, tf.gather(bottom_corner, rectangle), 0)
    # Pixels of two or four samples: each column but its corners, walked with the row stride.
    on = tf.ragged.range(
        top + top_corner, bottom - bottom_corner, tf.gather(stride, rectangle)
    ).flat_values
    # Corners: on where two meet (they are few, on the edges of rectangles).
    corners = tf.concat(
        _gather_where(top_corner > 0, top)
        + _gather_where(bottom_corner > 0, bottom - bottom_corner),
        0,
    )
    corners = tf.sort(corners)
    (repeated,) = _gather_where(tf.equal(corners[1:], corners[:-1]), corners[1:])
    num_pixels = tf.reduce_sum(box_pixels)
    # Unvalidated: a pixel may be listed twice (two rectangles holding 2 of its samples each,
    # or three corners meeting); it is set to 1 twice.
    boxes = tf.raw_ops.SparseToDense(
        sparse_indices=tf.concat([on, repeated], 0),
        output_shape=num_pixels[tf.newaxis],
        sparse_values=tf.constant(1, tf.uint8),
        default_value=tf.constant(0, tf.uint8),
        validate_indices=False,
    )
    packed = _pack_bits(tf.reshape(boxes, [num_pixels // 8, 8]))
    # Byte k of row r of instance i's box is output byte
    # `out_first[i] + (box_y0[i] + r) * out_width[i] / 8 + box_b0[i] + k`.
    row_bytes = out_width // 8
    out_first = tf.cumsum(out_height * row_bytes, exclusive=True)
    rows = tf.ragged.range(box_height)
    row_instance = _row_ids(rows.row_splits, tf.size(rows.flat_values, out_type=tf.int64))
    row_start = tf.gather(out_first + box_y0 * row_bytes + box_b0, row_instance) + (
        rows.flat_values * tf.gather(row_bytes, row_instance)
    )
    place = tf.ragged.range(row_start, row_start + tf.gather(box_bytes, row_instance))
    return tf.raw_ops.SparseToDense(
        sparse_indices=place.flat_values,
        output_shape=tf.reduce_sum(out_height * row_bytes)[tf.newaxis],
        sparse_values=packed,
        default_value=tf.constant(0, tf.uint8),
        validate_indices=False,
    )


def resize_starts(index, source_size) -> tf.Tensor:
    """A nearest-neighbour resize's index map `[h]` (the source index of each resized index,
    non-decreasing in `[0, source_size)`) -> the resized index where each source index starts,
    `[source_size + 1]` int32: source index r becomes resized indices `[starts[r], starts[r + 1])`
    (`starts[0] = 0`, `starts[source_size] = h`). The form `compute_targets_from_runs_batch`
    takes."""
    index = tf.cast(index, tf.int64)
    return tf.searchsorted(index, tf.range(tf.cast(source_size, tf.int64) + 1), side="left")


def _monotonic_within(index: tf.Tensor, size) -> tf.Tensor:
    """Whether `index` `[h]` is non-decreasing within `[0, size)`."""
    index = tf.cast(index, tf.int64)
    return (
        tf.reduce_all(index[1:] >= index[:-1])
        & tf.reduce_all(index >= 0)
        & tf.reduce_all(index < tf.cast(size, tf.int64))
    )


def _valid_starts(starts: tf.RaggedTensor, source_size: tf.Tensor, limit: tf.Tensor) -> tf.Tensor:
    """Whether each row j of `starts` `[J, (S + 1)]` is a `resize_starts` of a map of
    `source_size[j]` (`[J]` int64) source indices: `source_size[j] + 1` values, from 0,
    non-decreasing, at most `limit`."""
    values = tf.cast(starts.flat_values, tf.int64)
    splits = tf.cast(starts.row_splits, tf.int64)
    size = tf.size(values, out_type=tf.int64)
    first = tf.equal(tf.range(size), tf.gather(splits, _row_ids(splits, size)))
    return (
        tf.reduce_all(tf.equal(splits[1:] - splits[:-1], source_size + 1))
        & tf.reduce_all(tf.equal(values, 0) | tf.logical_not(first))
        & tf.reduce_all((values[1:] >= values[:-1]) | first[1:])
        & tf.reduce_all(values <= tf.cast(limit, tf.int64))
    )


def compute_targets_from_runs(
    boxes: tf.Tensor,
    classes: tf.Tensor,
    runs: tf.RaggedTensor,
    is_crowd: tf.Tensor,
    *,
    source_height,
    source_width,
    source_rows: tf.Tensor,
    source_cols: tf.Tensor,
    flip,
    padded_height,
    padded_width,
    grids: tuple[int, ...] = GRIDS,
    scale_ranges: tuple[tuple[float, float], ...] = SCALE_RANGES,
    sigma: float = SIGMA,
    check_geometry: bool = True,
) -> dict[str, tf.Tensor]:
    """`compute_targets` of masks given as run lengths at their source size, exactly.

    The masks `compute_targets` would see are `masks = pad(mirror(source[:, source_rows][:, :,
    source_cols]))`: a nearest-neighbour resize given by its source indices, then a horizontal
    mirror when `flip`, then zero padding at the bottom / right to `padded_height` x
    `padded_width`. This function returns the same dict, value for value, without building them:
    each foreground run is a rectangle of source pixels, hence (the index maps being monotonic)
    a rectangle of `masks`, whose pixel count and row / column sums have closed forms, and
    whose 1/4-scale samples are counted directly at 1/4 scale.

    Args:
      boxes, classes, is_crowd, grids, scale_ranges, sigma: as `compute_targets` (boxes at the
        padded input, after the flip).
      runs: `[N, (M)]` int ragged: COCO uncompressed RLE of the `[N, H0, W0]` source masks
        (column-major pixels, alternating background / foreground runs, background first; each
        row sums to H0 * W0).
      source_height, source_width: H0 and W0, int scalars.
      source_rows: `[h]` int32, non-decreasing, in `[0, H0)`: the source row of each resized row
        (`[w]` `source_cols` likewise); h, w are the resized size.
      flip: bool scalar: mirror the resized masks horizontally (before padding).
      padded_height, padded_width: int scalars, multiples of 32, at least h and w.
      check_geometry: check the index maps and h, w in the graph (about 25 small ops per call).
        Off only for maps already checked, such as SoloTargetGen's cached ones.

    Returns:
      `compute_targets(boxes, classes, masks, is_crowd, ...)`: `cell_class`, `cell_instance`,
      `instance_num_cells`, `instance_area`, and its `instance_masks` in a compact form,
      `packed_masks` `[N, ceil(h / 4), ceil(w / 32)]` uint8: the rows and columns of the
      `[N, padded_height / 4, padded_width / 4]` masks that the resized image reaches (the rest
      is zero), 8 pixels of a row per byte, as `np.packbits(instance_masks[:, :ceil(h / 4),
      :8 * ceil(w / 32)], axis=-1)`. `unpack_masks(packed_masks, padded_height / 4,
      padded_width / 4)` is `instance_masks`. About 14x smaller at the 1344 pad: SoloTargetGen
      stores them as they are. And `source_area` `[N]` int64: foreground pixels at H0 x W0.

    Computed as `compute_targets_from_runs_batch` of one image made from one source image.
    """
    checks = []
    if check_geometry:
        checks.append(
            tf.debugging.Assert(
                _monotonic_within(source_rows, source_height)
                & _monotonic_within(source_cols, source_width),
                ["source_rows / source_cols must be non-decreasing source indices"],
            )
        )
    with tf.control_dependencies(checks):
        row_starts = resize_starts(source_rows, source_height)
        col_starts = resize_starts(source_cols, source_width)
    batch = compute_targets_from_runs_batch(
        boxes,
        classes,
        runs,
        is_crowd,
        mask_splits=tf.stack([0, runs.nrows(out_type=tf.int32)]),
        source_height=tf.reshape(source_height, [1]),
        source_width=tf.reshape(source_width, [1]),
        source_image=tf.zeros([1], tf.int32),
        row_starts=_one_row(row_starts),
        col_starts=_one_row(col_starts),
        flip=tf.reshape(flip, [1]),
        padded_height=padded_height,
        padded_width=padded_width,
        grids=grids,
        scale_ranges=scale_ranges,
        sigma=sigma,
        check_geometry=check_geometry,
    )
    return targets_of_image(batch, 0)


def _one_row(index) -> tf.RaggedTensor:
    """`[h]` -> `[1, (h)]`."""
    index = tf.convert_to_tensor(index)
    return tf.RaggedTensor.from_row_lengths(index, tf.shape(index, tf.int64), validate=False)


def compute_targets_from_runs_batch(
    boxes: tf.Tensor,
    classes: tf.Tensor,
    runs: tf.RaggedTensor,
    is_crowd: tf.Tensor,
    *,
    mask_splits: tf.Tensor,
    source_height: tf.Tensor,
    source_width: tf.Tensor,
    source_image: tf.Tensor,
    row_starts: tf.RaggedTensor,
    col_starts: tf.RaggedTensor,
    flip: tf.Tensor,
    padded_height,
    padded_width,
    grids: tuple[int, ...] = GRIDS,
    scale_ranges: tuple[tuple[float, float], ...] = SCALE_RANGES,
    sigma: float = SIGMA,
    check_geometry: bool = True,
) -> dict[str, tf.Tensor]:
    """`compute_targets_from_runs` of J images made from S source images, in one call.

    The graph has a fixed cost of some hundreds of small ops, whatever the number of instances;
    SoloTargetGen pays it once per batch of images rather than once per image. An image is a
    source image resized, maybe flipped: several images of one source image (SoloTargetGen's
    variants) share the parsing of its runs into rectangles, and only map those to each
    image's geometry.

    Args:
      runs: `[N0, (M)]` int ragged, the runs (see `compute_targets_from_runs`) of the masks of
        S source images, image by image: source image s holds masks `[mask_splits[s],
        mask_splits[s + 1])` (`mask_splits` `[S + 1]` int, ascending from 0).
      source_height, source_width: `[S]` int: each source image's H0 and W0.
      source_image: `[J]` int in `[0, S)`: the source image of each image (any order, repeats
        allowed). Image j has the instances of its source image, in their order.
      boxes, classes, is_crowd: as `compute_targets_from_runs`, for the N instances of the J
        images, image by image (N = the sum of the images' instance counts).
      row_starts: `[J, (H0 + 1)]` int ragged: row j is `resize_starts` of image j's
        `source_rows` (see `compute_targets_from_runs`), its last value the resized height;
        `col_starts` `[J, (W0 + 1)]` likewise. The resize in the form the rectangles need:
        source rows `[r0, r1)` become resized rows `[row_starts[j, r0], row_starts[j, r1])`.
      flip: `[J]` bool.
      padded_height, padded_width: int scalars, the same pad for every image.
      grids, scale_ranges, sigma, check_geometry: as `compute_targets_from_runs`.

    Returns:
      dict with `cell_class`, `cell_instance` `[J, sum(S^2)]` int32 (row j is image
      j's; `cell_instance` counts image j's instances from 0), `instance_num_cells`,
      `instance_area` `[N]` int32, `source_area` `[N]` int64, `instance_splits` `[J + 1]` int32
      (image j's instances are `[instance_splits[j], instance_splits[j + 1])`),
      and the packed masks as `packed_masks` `[J, (bytes)]` uint8 ragged with `packed_shape`
      `[J, 3]` int32: row j reshaped to `packed_shape[j]` is image j's `[N_j, ceil(h_j / 4),
      ceil(w_j / 32)]` packed masks. `targets_of_image(result, j)` is
      `compute_targets_from_runs` of image j alone, bit for bit (tested): images share the graph
      call and their source's rectangles, nothing else.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    classes = tf.cast(classes, tf.int32)
    is_crowd = tf.cast(is_crowd, tf.bool)
    mask_splits = tf.cast(mask_splits, tf.int32)
    source_height = tf.cast(source_height, tf.int64)
    source_width = tf.cast(source_width, tf.int64)
    source_image = tf.cast(source_image, tf.int32)
    flip = tf.cast(flip, tf.bool)
    padded_height = tf.cast(padded_height, tf.int32)
    padded_width = tf.cast(padded_width, tf.int32)
    # The images' instances, image by image, and the mask (row of `runs`) of each.
    by_image = tf.ragged.range(
        tf.gather(mask_splits, source_image), tf.gather(mask_splits, source_image + 1)
    )
    instance_mask = by_image.flat_values  # [N]
    instance_splits = tf.cast(by_image.row_splits, tf.int32)  # [J + 1]
    num_instances = tf.size(instance_mask)
    instance_image = _row_ids(by_image.row_splits, num_instances)  # [N]
    num_masks = runs.nrows(out_type=tf.int32)
    # Resized size: the last start of each row.
    new_height = tf.gather(row_starts.flat_values, row_starts.row_splits[1:] - 1)  # [J]
    new_width = tf.gather(col_starts.flat_values, col_starts.row_splits[1:] - 1)
    new_height, new_width = tf.cast(new_height, tf.int32), tf.cast(new_width, tf.int32)
    # Only the resized image can be nonzero at 1/4 scale: rows [0, ceil(h / 4)), columns
    # [0, ceil(w / 4)), rounded up to whole bytes of 8 columns (w <= padded_width, a multiple of 32).
    out_height = (new_height + MASK_STRIDE - 1) // MASK_STRIDE  # [J]
    out_width = (new_width + 8 * MASK_STRIDE - 1) // (8 * MASK_STRIDE) * 8
    instance_out_height = tf.gather(out_height, instance_image)  # [N]
    instance_out_width = tf.gather(out_width, instance_image)

    # Rectangles of each mask, once per source image whatever its number of images.
    mask_source = _row_ids(mask_splits, num_masks)  # [N0]
    mask_rectangles, run_totals, mask_area = _run_rectangles(
        runs, tf.gather(source_height, mask_source)
    )
    num_pixels = tf.reduce_sum(
        tf.cast(instance_out_height, tf.int64) * tf.cast(instance_out_width, tf.int64)
    )
    checks = [
        tf.debugging.Assert(
            tf.equal(padded_height % 32, 0) & tf.equal(padded_width % 32, 0),
            ["padded size must be a multiple of 32:", padded_height, padded_width],
        ),
        tf.debugging.Assert(
            tf.equal(mask_splits[-1], num_masks)
            & tf.equal(tf.shape(classes)[0], num_instances)
            & tf.equal(tf.shape(boxes)[0], num_instances)
            & tf.equal(tf.shape(is_crowd)[0], num_instances),
            [
                "mask_splits must end at the number of masks, and the images' instance count",
                "must be that of boxes, classes and is_crowd",
            ],
        ),
        tf.debugging.Assert(
            tf.reduce_all(
                tf.equal(run_totals, tf.gather(source_height * source_width, mask_source))
            ),
            ["runs must cover the source masks exactly"],
        ),
        tf.debugging.Assert(
            num_pixels < 2**31, ["too many instances for int32 output pixel indices"]
        ),
    ]
    if check_geometry:
        checks.append(
            tf.debugging.Assert(
                _valid_starts(row_starts, tf.gather(source_height, source_image), padded_height)
                & _valid_starts(col_starts, tf.gather(source_width, source_image), padded_width),
                ["row_starts / col_starts must be non-decreasing from 0 to within the pad"],
            )
        )
    # Each image instance gets its mask's rectangles (they come mask by mask).
    rectangle_splits = tf.searchsorted(
        tf.cast(mask_rectangles[0], tf.int32), tf.range(num_masks + 1), out_type=tf.int64
    )  # [N0 + 1]
    by_instance = tf.ragged.range(
        tf.gather(rectangle_splits, instance_mask), tf.gather(rectangle_splits, instance_mask + 1)
    )
    rectangle = by_instance.flat_values  # [R]: a rectangle of each image instance
    instance = _row_ids(by_instance.row_splits, tf.size(rectangle, out_type=tf.int64))
    row0, row1, col0, col1 = (tf.gather(v, rectangle) for v in mask_rectangles[1:])
    image = tf.gather(tf.cast(instance_image, tf.int64), instance)  # [R]

    # Resized rows from source rows [r0, r1) are [row_starts[r0], row_starts[r1]), same for
    # columns. Everything below depends on these, so nothing runs past a failed check.
    with tf.control_dependencies(checks):
        row_offset = tf.gather(tf.cast(row_starts.row_splits, tf.int64), image)
        col_offset = tf.gather(tf.cast(col_starts.row_splits, tf.int64), image)
    y0, y1 = (tf.gather(row_starts.flat_values, row_offset + bound) for bound in (row0, row1))
    x0, x1 = (tf.gather(col_starts.flat_values, col_offset + bound) for bound in (col0, col1))
    y0, y1, x0, x1 = (tf.cast(bound, tf.int64) for bound in (y0, y1, x0, x1))
    mirrored = tf.gather(flip, image)
    width = tf.gather(tf.cast(new_width, tf.int64), image)
    x0, x1 = (tf.where(mirrored, width - x1, x0), tf.where(mirrored, width - x0, x1))

    # Moments of the rectangles, exact in int64: sum of y over [y0, y1) is T(y1) - T(y0).
    def triangle(n):
        return tf.bitwise.right_shift(n * (n - 1), 1)  # n >= 0: n * (n - 1) // 2

    height, width = y1 - y0, x1 - x0
    area = tf.math.unsorted_segment_sum(height * width, instance, num_instances)
    row_sum = tf.math.unsorted_segment_sum(
        (triangle(y1) - triangle(y0)) * width, instance, num_instances
    )
    col_sum = tf.math.unsorted_segment_sum(
        (triangle(x1) - triangle(x0)) * height, instance, num_instances
    )
    targets = _assign_cells(
        *(boxes, classes, is_crowd),
        *(tf.cast(moment, tf.float64) for moment in (area, row_sum, col_sum)),
        *(instance_splits, padded_height, padded_width, grids, scale_ranges, sigma),
    )
    int32 = [tf.cast(v, tf.int32) for v in (instance, y0, y1, x0, x1)]
    packed = _downsample_rectangles(*int32, instance_out_height, instance_out_width)
    image_instances = instance_splits[1:] - instance_splits[:-1]
    packed_shape = tf.stack([image_instances, out_height, out_width // 8], axis=1)
    targets["packed_masks"] = tf.RaggedTensor.from_row_lengths(
        packed, tf.reduce_prod(packed_shape, axis=1), validate=False
    )
    targets["packed_shape"] = packed_shape
    targets["source_area"] = tf.gather(mask_area, instance_mask)
    targets["instance_splits"] = instance_splits
    return targets


def targets_of_image(batch: dict[str, tf.Tensor], j) -> dict[str, tf.Tensor]:
    """Image j's `compute_targets_from_runs` dict, from `compute_targets_from_runs_batch`'s."""
    start, end = batch["instance_splits"][j], batch["instance_splits"][j + 1]
    targets = {name: batch[name][j] for name in ("cell_class", "cell_instance")}
    for name in ("instance_num_cells", "instance_area", "source_area"):
        targets[name] = batch[name][start:end]
    targets["packed_masks"] = tf.reshape(batch["packed_masks"][j], batch["packed_shape"][j])
    return targets


__all__ = [
    "GRIDS",
    "LEVEL_OFFSETS",
    "MASK_STRIDE",
    "NUM_CELLS",
    "SCALE_RANGES",
    "SIGMA",
    "compute_targets",
    "compute_targets_from_runs",
    "compute_targets_from_runs_batch",
    "downsample_masks",
    "level_offsets",
    "num_cells",
    "resize_starts",
    "target_shapes",
    "targets_of_image",
    "unpack_masks",
]
