"""Per-example SOLO target materialisation (Beam side) and the one training decoder (tf.data side).

`TargetMaker.add_targets_to_record` takes a serialized CocoExampleGen tf.Example and returns it
with K target variants added (see `docs/CONTRACT.md` and the `SOLO_*` keys in
`schemas/features.py`), plus a count of degenerate instances for the component report. `decode_training_example` is the only
code that reads those features back, inside tf.data.

Why variants rather than online recomputation: horizontal flip (on in every official recipe) and
multi-scale resize both change which cells an object occupies, so targets cannot be flipped or
rescaled after the fact. Materialising (short side x flip) variants in Beam keeps training free
of assignment work and keeps the augmentation random per step (the trainer draws a variant per
image per step), at the cost of K copies of the 1/4-scale masks (bit-packed, cropped to the
resized image, then gzip-compressed with the rest of the record).
`benchmarks/targets.py` measures the cost per image.

Masks are never decoded to pixels here: the example's compressed RLE is parsed to run lengths
once per image, and `models.targets.compute_targets_from_runs` computes every variant from the
runs plus the source index maps of `preprocess.resize_masks` (see `nearest_source_indices`),
with the same values as `compute_targets` on the resized, flipped, padded masks (tested).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils

from models import preprocess
from models.targets import compute_targets_from_runs, unpack_masks
from schemas import features


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What SoloTargetGen needs from the model config, as plain values."""

    grids: tuple[int, ...]
    scale_ranges: tuple[tuple[float, float], ...]
    sigma: float
    max_size: int
    variants: tuple[tuple[int, bool], ...]  # (short side, flip)

    @property
    def pad(self) -> int:
        return preprocess.padded_size(self.max_size)


def decode_rle_masks(example: tf.train.Example) -> np.ndarray:
    """[N, H, W] uint8 masks from the example's compressed RLE (pycocotools)."""
    f = example.features.feature
    height = f[features.IMAGE_HEIGHT].int64_list.value[0]
    width = f[features.IMAGE_WIDTH].int64_list.value[0]
    rles = [
        {"size": [height, width], "counts": counts}
        for counts in f[features.OBJECT_MASK_RLE].bytes_list.value
    ]
    if not rles:
        return np.zeros((0, height, width), np.uint8)
    return np.ascontiguousarray(np.transpose(mask_utils.decode(rles), (2, 0, 1)))


def rle_runs(counts: tf.Tensor) -> tf.RaggedTensor:
    """`[N]` compressed COCO RLE strings -> `[N, (M)]` int64 run lengths (uncompressed RLE).

    pycocotools' `rleFrString`, vectorized over all characters of all strings. A value is
    written as 5-bit groups, least significant first, each as the character `48 + group`, plus
    32 when another group follows; bit 4 of the last group is the sign. From the third value
    on, a value is stored as its difference to the value two before.
    """
    # The strings are ASCII: decode the bytes of all of them, end to end.
    code = tf.cast(tf.io.decode_raw(tf.strings.reduce_join(counts), tf.uint8), tf.int64) - 48
    char_splits = tf.concat([[0], tf.cumsum(tf.strings.length(counts))], 0)
    last = tf.equal(tf.bitwise.bitwise_and(code, 32), 0)  # the last group of a value
    value = tf.cumsum(tf.cast(last, tf.int64), exclusive=True)  # the value each group belongs to
    num_values = tf.reduce_sum(tf.cast(last, tf.int64))
    position = tf.range(tf.size(code, out_type=tf.int64))
    group = position - tf.gather(tf.math.unsorted_segment_min(position, value, num_values), value)
    bits = tf.bitwise.left_shift(tf.bitwise.bitwise_and(code, 31), 5 * group)
    # A negative value: x |= -1 << 5 * (group + 1), i.e. x - 2 ** (5 * (group + 1)).
    sign = tf.bitwise.left_shift(tf.constant(1, tf.int64), 5 * (group + 1))
    negative = last & tf.not_equal(tf.bitwise.bitwise_and(code, 16), 0)
    bits -= tf.where(negative, sign, tf.zeros_like(sign))
    deltas = tf.math.unsorted_segment_sum(bits, value, num_values)

    # Every string ends with a whole value: row i's values start at the value of its first char.
    splits = tf.gather(tf.concat([value, [num_values]], 0), char_splits)
    row = tf.searchsorted(splits[1:], tf.range(num_values), side="right")
    first = tf.gather(splits, row)  # flat index of the row's value 0
    index = tf.range(num_values) - first
    # Undo the differences: from value 1 on, a value is the sum of the deltas of its parity.
    summed = tf.where(index == 0, tf.zeros_like(deltas), deltas)
    runs = deltas
    for parity in (0, 1):
        own = tf.equal(index % 2, parity)
        cumulative = tf.cumsum(tf.where(own, summed, tf.zeros_like(summed)))
        runs = tf.where(own & (index > 0), cumulative - tf.gather(cumulative, first), runs)
    return tf.RaggedTensor.from_row_splits(runs, splits, validate=False)


@functools.lru_cache(maxsize=4096)
def nearest_source_indices(
    height: int, width: int, new_height: int, new_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source row of each of the `new_height` rows and source column of each of the `new_width`
    columns that `preprocess.resize_masks` copies (int32 `[new_height]`, `[new_width]`).

    Asked of the resize itself rather than re-derived: a ramp 0, 1, ... (as three base-256
    digits, one uint8 mask each) is resized along each axis. Nearest-neighbour resizing picks
    rows and columns independently, so these maps are the whole resize. Cached: COCO images
    come in few sizes.
    """

    def source(size: int, new_size: int, axis: int) -> np.ndarray:
        ramp = np.arange(size)
        digits = np.stack([(ramp >> shift) & 255 for shift in (0, 8, 16)]).astype(np.uint8)
        digits = np.expand_dims(digits, 2 - axis)  # [3, size, 1] (rows) or [3, 1, size] (columns)
        resized = preprocess.resize_masks(
            digits, *((new_size, 1) if axis == 0 else (1, new_size))
        ).numpy()
        digit = resized.reshape(3, new_size).astype(np.int64)
        return (digit[0] | digit[1] << 8 | digit[2] << 16).astype(np.int32)

    if max(height, width) >= 1 << 24:
        raise ValueError(f"image {height}x{width} too large for 3-digit source indices")
    return source(height, new_height, 0), source(width, new_width, 1)


# Targets stored in the example (as `tf.io.serialize_tensor` bytes), by feature key: the
# 1/4-scale masks bit-packed and cropped to the resized image (`models.targets.unpack_masks`).
_SERIALIZED = {
    "cell_class": features.SOLO_CELL_CLASS,
    "cell_instance": features.SOLO_CELL_INSTANCE,
    "packed_masks": features.SOLO_INSTANCE_MASKS,
}


@functools.lru_cache(maxsize=4096)
def _variant_geometry(height: int, width: int, short_side: int, max_size: int) -> tuple:
    """(resized height, width, source rows, source columns as int32 tensors) of one variant.

    Cached: COCO images come in few sizes, so each geometry is computed and checked once per
    worker (the target graph then skips its own geometry checks).
    """
    new_height, new_width = preprocess.resized_shape(height, width, short_side, max_size)
    new_height, new_width = int(new_height), int(new_width)
    rows, cols = nearest_source_indices(height, width, new_height, new_width)
    pad = preprocess.padded_size(max_size)
    for index, size in ((rows, height), (cols, width)):
        inside = len(index) <= pad and index.min() >= 0 and index.max() < size
        if not (inside and np.all(np.diff(index) >= 0)):
            raise ValueError(f"bad resize of {height}x{width} to {new_height}x{new_width}")
    return new_height, new_width, tf.constant(rows), tf.constant(cols)


# What the target graph reads from a CocoExampleGen example.
_SOURCE_FEATURES = {
    features.IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    features.IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    features.OBJECT_MASK_RLE: tf.io.VarLenFeature(tf.string),
    features.OBJECT_CLASS: tf.io.VarLenFeature(tf.int64),
    features.OBJECT_IS_CROWD: tf.io.VarLenFeature(tf.int64),
    **{key: tf.io.VarLenFeature(tf.float32) for key in features.OBJECT_BOX_KEYS},
}

# Degenerate-instance counts of the canonical variant, in the order the graph returns them.
COUNT_NAMES = (
    "instances",
    "crowd",
    "empty_mask",
    "empty_after_resize",
    "no_positive_cells",
    "positive_instances",
)


class TargetMaker:
    """Adds SOLO target variants to CocoExampleGen examples. Build once per worker."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self._functions = {}  # number of variants -> concrete function
        self._flips = {}  # variants -> their flips as a tensor

    def _targets_fn(self, num_variants: int):
        """One graph call per image: the example is parsed, its RLE decoded to runs once, then
        each variant is computed and serialized. A concrete function, called with tensors (the
        cheapest call)."""
        if num_variants not in self._functions:
            per_variant = [tf.TensorSpec([None], tf.int32)] * num_variants
            self._functions[num_variants] = tf.function(self._targets).get_concrete_function(
                tf.TensorSpec([], tf.string),  # a serialized example with `_SOURCE_FEATURES`
                per_variant,  # source row of each resized row
                per_variant,  # source column of each resized column
                tf.TensorSpec([num_variants], tf.bool),  # flip
            )
        return self._functions[num_variants]

    def _targets(self, record, source_rows, source_cols, flips):
        """Returns the serialized targets `[K * 3]` (variant-major, `_SERIALIZED` order) and the
        first variant's degenerate counts `[len(COUNT_NAMES)]`."""
        parsed = tf.io.parse_single_example(record, _SOURCE_FEATURES)
        size = tf.cast(
            tf.stack([parsed[features.IMAGE_HEIGHT], parsed[features.IMAGE_WIDTH]]), tf.int32
        )
        boxes_xyxy = tf.stack([parsed[key].values for key in features.OBJECT_BOX_KEYS], axis=1)
        classes = tf.cast(parsed[features.OBJECT_CLASS].values, tf.int32)
        is_crowd = tf.equal(parsed[features.OBJECT_IS_CROWD].values, 1)
        runs = rle_runs(parsed[features.OBJECT_MASK_RLE].values)
        serialized = []
        for k, (rows, cols) in enumerate(zip(source_rows, source_cols)):
            targets = self._variant(runs, boxes_xyxy, classes, is_crowd, size, rows, cols, flips[k])
            serialized += [tf.io.serialize_tensor(targets[name]) for name in _SERIALIZED]
            if k == 0:
                counts = _degenerate_counts(is_crowd, targets)
        return tf.stack(serialized), counts

    def _variant(self, runs, boxes_xyxy, classes, is_crowd, size, source_rows, source_cols, flip):
        spec = self.spec
        height, width = size[0], size[1]
        new_h, new_w = tf.shape(source_rows)[0], tf.shape(source_cols)[0]
        scale_x = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
        scale_y = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
        xmin, ymin = boxes_xyxy[:, 0] * scale_x, boxes_xyxy[:, 1] * scale_y
        xmax, ymax = boxes_xyxy[:, 2] * scale_x, boxes_xyxy[:, 3] * scale_y
        new_w_f = tf.cast(new_w, tf.float32)
        xmin, xmax = (
            tf.where(flip, new_w_f - xmax, xmin),
            tf.where(flip, new_w_f - xmin, xmax),
        )
        return compute_targets_from_runs(
            tf.stack([ymin, xmin, ymax, xmax], axis=1),
            classes,
            runs,
            is_crowd,
            source_height=height,
            source_width=width,
            source_rows=source_rows,
            source_cols=source_cols,
            flip=flip,
            padded_height=spec.pad,
            padded_width=spec.pad,
            grids=spec.grids,
            scale_ranges=spec.scale_ranges,
            sigma=spec.sigma,
            check_geometry=False,  # checked by `_variant_geometry`
        )

    def add_targets_to_record(
        self, record: bytes, variants: tuple[tuple[int, bool], ...] | None = None
    ) -> tuple[bytes, collections.Counter]:
        """Returns (the serialized example `record` with targets, counts of degenerate instances).

        What SoloTargetGen does per example. The targets are appended as a second serialized
        Example holding only the new features: protobuf parses a concatenation as the merge of
        its parts, so the result reads as the input example plus the targets, and the input's
        bytes (mostly the JPEG) are copied once, not parsed and re-serialized.

        Degenerate instances are counted for the first (canonical) variant: `crowd` (never
        positive), `empty_mask` (zero pixels at the original size), `empty_after_resize`,
        and `no_positive_cells` (non-crowd, non-empty, yet no cell: scale outside every range or
        overwritten by later instances). They stay in the example; they are not dropped.
        """
        variants = tuple(variants or self.spec.variants)
        f = tf.train.Example.FromString(record).features.feature
        height = f[features.IMAGE_HEIGHT].int64_list.value[0]
        width = f[features.IMAGE_WIDTH].int64_list.value[0]
        geometry = [
            _variant_geometry(height, width, side, self.spec.max_size) for side, _ in variants
        ]
        if variants not in self._flips:
            self._flips[variants] = tf.constant([flip for _, flip in variants], tf.bool)
        # The graph gets the features it reads, not the JPEG: handing a string to TF copies it.
        source = tf.train.Example()
        for key in _SOURCE_FEATURES:
            if key in f:
                source.features.feature[key].CopyFrom(f[key])
        serialized, counts = self._targets_fn(len(variants))(
            tf.constant(source.SerializeToString()),
            [rows for _, _, rows, _ in geometry],
            [cols for _, _, _, cols in geometry],
            self._flips[variants],
        )

        targets = tf.train.Example()
        g = targets.features.feature
        g[features.SOLO_VARIANT_SHORT_SIDE].int64_list.value.extend(side for side, _ in variants)
        g[features.SOLO_VARIANT_FLIP].int64_list.value.extend(int(flip) for _, flip in variants)
        g[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value.extend(h for h, *_ in geometry)
        g[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value.extend(w for _, w, *_ in geometry)
        serialized = serialized.numpy().reshape(len(variants), len(_SERIALIZED))
        for key, values in zip(_SERIALIZED.values(), serialized.T):
            g[key].bytes_list.value.extend(values)
        g[features.SOLO_PADDED_SIZE].int64_list.value.append(self.spec.pad)
        counts = collections.Counter(dict(zip(COUNT_NAMES, counts.numpy().tolist())))
        return record + targets.SerializeToString(), counts

    def add_targets(
        self, example: tf.train.Example, variants: tuple[tuple[int, bool], ...] | None = None
    ) -> tuple[tf.train.Example, collections.Counter]:
        """`add_targets_to_record` on a parsed example: (a copy with targets, counts)."""
        record, counts = self.add_targets_to_record(example.SerializeToString(), variants)
        return tf.train.Example.FromString(record), counts


def _degenerate_counts(is_crowd: tf.Tensor, targets: dict) -> tf.Tensor:
    """`[len(COUNT_NAMES)]` int32 counts of one variant's instances (see `add_targets_to_record`)."""
    empty = tf.equal(targets["source_area"], 0)
    empty_after = tf.equal(targets["instance_area"], 0)
    positive = targets["instance_num_cells"] > 0
    kept = tf.logical_not(is_crowd)
    counts = [
        tf.ones_like(is_crowd),
        is_crowd,
        empty & kept,
        empty_after & tf.logical_not(empty) & kept,
        tf.logical_not(positive) & tf.logical_not(empty_after) & kept,
        positive,
    ]
    return tf.reduce_sum(tf.cast(tf.stack(counts), tf.int32), axis=1)


# Parsing spec for the features that training needs (the rest of the example is ignored).
_TRAINING_FEATURES = {
    features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    features.IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    features.IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    features.IMAGE_ID: tf.io.FixedLenFeature([], tf.int64),
    features.SOLO_VARIANT_SHORT_SIDE: tf.io.VarLenFeature(tf.int64),
    features.SOLO_VARIANT_FLIP: tf.io.VarLenFeature(tf.int64),
    features.SOLO_CELL_CLASS: tf.io.VarLenFeature(tf.string),
    features.SOLO_CELL_INSTANCE: tf.io.VarLenFeature(tf.string),
    features.SOLO_INSTANCE_MASKS: tf.io.VarLenFeature(tf.string),
}


def decode_training_example(
    serialized: tf.Tensor, *, max_size: int, num_cells: int, random_variant: bool, seed=None
) -> dict[str, tf.Tensor]:
    """One serialized SoloTargetGen example -> model input and targets (tf.data map function).

    Returns `images` [P, P, 3] float32 (normalised, padded), `cell_class` [num_cells] int32,
    `cell_instance` [num_cells] int32, `instance_masks` [N, P/4, P/4] uint8 (unpacked from the
    stored form, see `docs/CONTRACT.md`), `image_id` int64.
    With `random_variant`, one of the K variants is drawn uniformly; otherwise variant 0.
    """
    parsed = tf.io.parse_single_example(serialized, _TRAINING_FEATURES)
    short_sides = tf.sparse.to_dense(parsed[features.SOLO_VARIANT_SHORT_SIDE])
    num_variants = tf.shape(short_sides)[0]
    if random_variant:
        k = tf.random.uniform([], 0, num_variants, dtype=tf.int32, seed=seed)
    else:
        k = tf.constant(0)
    flip = tf.sparse.to_dense(parsed[features.SOLO_VARIANT_FLIP])[k] == 1
    image = preprocess.decode_image(parsed[features.IMAGE_ENCODED])
    images, _ = preprocess.preprocess_image(
        image, short_side=tf.cast(short_sides[k], tf.int32), max_size=max_size, flip=flip
    )
    pad = preprocess.padded_size(max_size)
    cell_class = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_CELL_CLASS])[k], tf.int32
    )
    cell_instance = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_CELL_INSTANCE])[k], tf.int32
    )
    packed_masks = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_INSTANCE_MASKS])[k], tf.uint8
    )
    instance_masks = unpack_masks(packed_masks, pad // 4, pad // 4)
    return {
        "images": images,
        "cell_class": tf.ensure_shape(cell_class, [num_cells]),
        "cell_instance": tf.ensure_shape(cell_instance, [num_cells]),
        "instance_masks": tf.ensure_shape(instance_masks, [None, pad // 4, pad // 4]),
        "image_id": parsed[features.IMAGE_ID],
    }
