"""Per-example SOLO target materialisation (Beam side) and the one training decoder (tf.data side).

`TargetMaker.add_targets_to_record` takes a serialized CocoExampleGen tf.Example and returns it
with K target variants added (see `docs/CONTRACT.md` and the `SOLO_*` keys in
`schemas/features.py`), plus a count of degenerate instances for the component report;
`add_targets_to_records` does the same for a batch of examples in one graph call (what
SoloTargetGen runs). `decode_training_example` is the only code that reads those features back,
inside tf.data.

Why variants rather than online recomputation: horizontal flip (on in every official recipe) and
multi-scale resize both change which cells an object occupies, so targets cannot be flipped or
rescaled after the fact. Materialising (short side x flip) variants in Beam keeps training free
of assignment work and keeps the augmentation random per step (the trainer draws a variant per
image per step), at the cost of K copies of the 1/4-scale masks (bit-packed, cropped to the
resized image, then gzip-compressed with the rest of the record).
`benchmarks/targets.py` measures the cost per image.

Masks are never decoded to pixels here: the example's compressed RLE is parsed to run lengths
once per image (`rle_runs`, NumPy), and `models.targets.compute_targets_from_runs_batch` computes
every variant of every example of a batch from the runs plus the resize of
`preprocess.resize_masks` (its source index maps, `nearest_source_indices`, as
`models.targets.resize_starts`, cached per geometry), with the same values as
`compute_targets` on the resized, flipped, padded masks (tested). The K variants of an example
share its runs and their rectangles (computed once per example); only the mapping of the
rectangles to each variant's geometry, the assignment and the 1/4-scale masks are per variant.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

from models import preprocess
from models.config import ExperimentConfig
from models.targets import compute_targets_from_runs_batch, resize_starts, unpack_masks
from schemas import features


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What SoloTargetGen needs from the model config, as plain values."""

    grids: tuple[int, ...]
    scale_ranges: tuple[tuple[float, float], ...]
    sigma: float
    max_size: int
    variants: tuple[tuple[int, bool], ...]  # (short side, flip)
    # Pad each image to its orientation's rectangle (`preprocess.orientation_pad_shape`)
    # rather than the square `pad`: training targets under `TrainConfig.orientation_pad`.
    orientation_pad: bool = False

    @property
    def pad(self) -> int:
        """The square pad P (serving, evaluation, and training without `orientation_pad`)."""
        return preprocess.padded_size(self.max_size)

    @property
    def max_short_side(self) -> int:
        """The largest short side of the variants: the orientation pad holds it."""
        return max(side for side, _ in self.variants)

    def pad_shape(self, height, width):
        """(pad height, pad width) of the targets of a `height` x `width` image (Python ints,
        or scalar tensors: see `preprocess.orientation_pad_shape`)."""
        if not self.orientation_pad:
            return self.pad, self.pad
        return preprocess.orientation_pad_shape(height, width, self.max_short_side, self.max_size)

    @classmethod
    def from_config(
        cls, config: ExperimentConfig, split: str, train_split: str = "train"
    ) -> TargetSpec:
        """The variants `split` gets under `config`: the training split every training short
        side x {no flip, flip} (flip only when the recipe flips), other splits the test scale."""
        model, train = config.model, config.train
        if split == train_split:
            flips = (False, True) if train.flip_prob > 0 else (False,)
            variants = tuple((side, flip) for side in train.train_short_sides for flip in flips)
            max_size = train.train_max_size
            orientation_pad = train.orientation_pad
        else:
            variants = ((model.image_short_side, False),)
            max_size = model.image_max_size
            orientation_pad = False
        if max_size != model.image_max_size:
            raise ValueError("train_max_size and image_max_size must agree (one static pad size)")
        return cls(
            model.grids, model.scale_ranges, model.sigma, max_size, variants, orientation_pad
        )

    def to_json(self) -> dict:
        """Plain JSON values (lists for tuples); what the targets report records per split."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


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


def rle_runs(counts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """`[N]` compressed COCO RLE strings -> `[N, (M)]` run lengths (uncompressed RLE), as the
    values of all rows end to end `[sum(M)]` int64 and the row splits `[N + 1]` int64.

    pycocotools' `rleFrString`, vectorized over all characters of all strings. A value is
    written as 5-bit groups, least significant first, each as the character `48 + group`, plus
    32 when another group follows; bit 4 of the last group is the sign. From the fourth value
    on, a value is stored as its difference to the value two before. NumPy rather than the same
    ops in TF: about 2.5x faster on a batch of 16 coco_tiny images (CPU, int64 throughout).
    """
    # The strings are ASCII: decode the bytes of all of them, end to end.
    code = np.frombuffer(b"".join(counts), np.uint8).astype(np.int64) - 48
    char_splits = np.cumsum([0] + [len(c) for c in counts], dtype=np.int64)
    last = (code & 32) == 0  # the last group of a value
    ends = np.flatnonzero(last)  # [values]: the last character of each value
    if not np.all(last[char_splits[1:][np.diff(char_splits) > 0] - 1]):
        raise ValueError("a compressed RLE string ends inside a value")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    value = np.repeat(np.arange(len(ends)), ends - starts + 1)  # the value of each character
    group = np.arange(len(code)) - starts[value]
    bits = (code & 31) << (5 * group)
    # A negative value: x |= -1 << 5 * (group + 1), i.e. x - 2 ** (5 * (group + 1)).
    negative = last & ((code & 16) != 0)
    bits -= np.where(negative, np.left_shift(1, 5 * (group + 1)), 0)
    deltas = np.add.reduceat(bits, starts) if len(ends) else bits

    # Every string ends with a whole value: row i's values start at the value of its first char.
    splits = np.searchsorted(ends, char_splits, side="left").astype(np.int64)
    first = np.repeat(splits[:-1], np.diff(splits))  # [values]: the row's value 0
    index = np.arange(len(ends)) - first
    # Undo the differences: from value 1 on, a value is the sum of the deltas of its parity.
    summed = np.where(index == 0, 0, deltas)
    runs = deltas
    for parity in (0, 1):
        own = index % 2 == parity
        cumulative = np.cumsum(np.where(own, summed, 0))
        runs = np.where(own & (index > 0), cumulative - cumulative[first], runs)
    return runs, splits


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


@functools.lru_cache(maxsize=4096)
def _variant_geometry(height: int, width: int, short_side: int, max_size: int) -> tuple:
    """(resized height h, width w, row starts `[height + 1]`, column starts `[width + 1]` int32)
    of one variant: the `models.targets.resize_starts` of the resize's source rows and columns
    (`nearest_source_indices`), the form the target graph takes.

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
    row_starts, col_starts = (
        resize_starts(index, size).numpy() for index, size in ((rows, height), (cols, width))
    )
    return new_height, new_width, row_starts, col_starts


def _serialize_tensor(array: np.ndarray) -> bytes:
    """`tf.io.serialize_tensor(array).numpy()`, bit for bit (tested), without a TF op call.

    A `TensorProto` serializes its fields in number order: dtype (1), shape (2), then the
    bytes of `tensor_content` (4) as tag 0x22, their length as a varint and the bytes (the
    field is left out when empty). The part before the content depends on the dtype and shape
    only (`_tensor_header`, cached); the content is appended as it is (3 to 4x faster).
    """
    content = memoryview(np.ascontiguousarray(array))  # no copy: `join` copies it once
    header = _tensor_header(array.dtype.str, array.shape)
    if not content.nbytes:
        return header
    size, length = content.nbytes, bytearray()
    while size > 127:
        length.append(size & 127 | 128)
        size >>= 7
    length.append(size)
    return b"".join((header, b"\x22", length, content))


@functools.lru_cache(maxsize=4096)
def _tensor_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The serialized `TensorProto` of a tensor of this dtype (NumPy `dtype.str`) and shape,
    without content."""
    return tensor_pb2.TensorProto(
        dtype=tf.as_dtype(np.dtype(dtype)).as_datatype_enum,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
        ),
    ).SerializeToString()


def _ragged_input(arrays: list[np.ndarray]) -> tuple[tf.Tensor, tf.Tensor]:
    """1-D arrays -> (their values end to end, row splits `[len + 1]` int64): a ragged tensor."""
    splits = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int64)
    return tf.constant(np.concatenate(arrays)), tf.constant(splits)


# What the target graph reads from a CocoExampleGen example (the masks come as runs).
_SOURCE_FEATURES = {
    features.IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    features.IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    features.OBJECT_CLASS: tf.io.RaggedFeature(tf.int64),
    features.OBJECT_IS_CROWD: tf.io.RaggedFeature(tf.int64),
    **{key: tf.io.RaggedFeature(tf.float32) for key in features.OBJECT_BOX_KEYS},
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
    """Adds SOLO target variants to CocoExampleGen examples. Build once per worker.

    `add_targets_to_records` handles a batch of examples in one graph call: the graph costs
    some hundreds of small ops whatever its input, so a batch pays that once (SoloTargetGen
    batches its input, see `components/solo_targets/component.py`). The targets of an example
    do not depend on the other examples of its batch (tested).
    """

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self._function = None

    def _targets_fn(self):
        """`_targets` as a concrete function, called with tensors (the cheapest call)."""
        if self._function is None:
            ints, flags, splits = (tf.TensorSpec([None], t) for t in (tf.int32, tf.bool, tf.int64))
            self._function = tf.function(self._targets).get_concrete_function(
                records=tf.TensorSpec([None], tf.string),
                runs=tf.TensorSpec([None], tf.int64),
                run_splits=splits,
                job_example=ints,
                flips=flags,
                row_starts=ints,
                row_splits=splits,
                col_starts=ints,
                col_splits=splits,
                padded_height=tf.TensorSpec([], tf.int32),
                padded_width=tf.TensorSpec([], tf.int32),
            )
        return self._function

    def _targets(
        self,
        records,
        runs,
        run_splits,
        job_example,
        flips,
        row_starts,
        row_splits,
        col_starts,
        col_splits,
        padded_height,
        padded_width,
    ):
        """The target graph of a batch: B examples, K variants each, J = B * K jobs (example,
        variant), example by example, all padded to `padded_height` x `padded_width` (int32
        scalars).

        Args:
          records: `[B]` serialized examples (`_SOURCE_FEATURES` are read).
          runs, run_splits: `[sum(M)]` int64 and `[N0 + 1]` int64: `rle_runs` of the masks of
            the batch's N0 instances, example by example.
          job_example: `[J]` int32, the example of each job; flips: `[J]` bool.
          row_starts, row_splits: `[sum(H0 + 1)]` int32 and `[J + 1]` int64: each job's resized
            row where each source row starts (`_variant_geometry`); col_starts, col_splits: the
            same for columns.

        Returns:
          `cell_class`, `cell_instance` `[J, NUM_CELLS]` int32; the packed masks of every job end
          to end `[bytes]` uint8 with their row splits `[J + 1]` and shapes `[J, 3]` (see
          `compute_targets_from_runs_batch`); degenerate counts `[J, len(COUNT_NAMES)]` int32.
        """
        parsed = tf.io.parse_example(records, _SOURCE_FEATURES)
        example_splits = parsed[features.OBJECT_CLASS].row_splits  # [B + 1]
        # Job j's instances are those of its example: `instance` numbers them job by job.
        by_job = tf.ragged.range(
            tf.gather(example_splits, job_example), tf.gather(example_splits, job_example + 1)
        )
        instance = by_job.flat_values  # [N]: the example instance of each job instance
        instance_job = tf.cast(by_job.value_rowids(), tf.int32)  # [N]

        def per_instance(key):
            return tf.gather(parsed[key].flat_values, instance)

        # The masks stay per example: its jobs share their rectangles (`source_image`).
        runs = tf.RaggedTensor.from_row_splits(runs, run_splits, validate=False)
        classes = tf.cast(per_instance(features.OBJECT_CLASS), tf.int32)
        is_crowd = tf.equal(per_instance(features.OBJECT_IS_CROWD), 1)
        xmin, ymin, xmax, ymax = (per_instance(key) for key in features.OBJECT_BOX_KEYS)

        height, width = parsed[features.IMAGE_HEIGHT], parsed[features.IMAGE_WIDTH]  # [B]
        # Boxes at the resized size (each job's last start), mirrored with the flip (float32,
        # as the masks' geometry).
        new_height = tf.cast(tf.gather(row_starts, row_splits[1:] - 1), tf.float32)  # [J]
        new_width = tf.cast(tf.gather(col_starts, col_splits[1:] - 1), tf.float32)
        job_height = tf.cast(tf.gather(height, job_example), tf.float32)  # [J]
        job_width = tf.cast(tf.gather(width, job_example), tf.float32)
        scale_y = tf.gather(new_height / job_height, instance_job)
        scale_x = tf.gather(new_width / job_width, instance_job)
        xmin, ymin, xmax, ymax = xmin * scale_x, ymin * scale_y, xmax * scale_x, ymax * scale_y
        flip = tf.gather(flips, instance_job)
        mirror_width = tf.gather(new_width, instance_job)
        xmin, xmax = (
            tf.where(flip, mirror_width - xmax, xmin),
            tf.where(flip, mirror_width - xmin, xmax),
        )
        spec = self.spec
        targets = compute_targets_from_runs_batch(
            tf.stack([ymin, xmin, ymax, xmax], axis=1),
            classes,
            runs,
            is_crowd,
            mask_splits=example_splits,
            source_height=height,
            source_width=width,
            source_image=job_example,
            row_starts=tf.RaggedTensor.from_row_splits(row_starts, row_splits, validate=False),
            col_starts=tf.RaggedTensor.from_row_splits(col_starts, col_splits, validate=False),
            flip=flips,
            padded_height=padded_height,
            padded_width=padded_width,
            grids=spec.grids,
            scale_ranges=spec.scale_ranges,
            sigma=spec.sigma,
            check_geometry=False,  # checked by `_variant_geometry`
        )
        packed = targets["packed_masks"]
        return (
            targets["cell_class"],
            targets["cell_instance"],
            packed.flat_values,
            packed.row_splits,
            targets["packed_shape"],
            _degenerate_counts(is_crowd, targets, instance_job, tf.size(job_example)),
        )

    def add_targets_to_records(
        self, records: Sequence[bytes], variants: tuple[tuple[int, bool], ...] | None = None
    ) -> list[tuple[bytes, collections.Counter]]:
        """`add_targets_to_record` of each record, in one graph call per pad shape (one call,
        or two under `orientation_pad`: landscape and portrait): a list, in input order."""
        if not records:
            return []
        variants = tuple(variants or self.spec.variants)
        if self.spec.orientation_pad and max(side for side, _ in variants) > (
            self.spec.max_short_side
        ):
            # The orientation pad holds the spec's largest short side, no larger one.
            raise ValueError(f"variants {variants} exceed the short sides of {self.spec}")
        sources, groups = [], {}  # groups: pad shape -> indices of its records
        for index, record in enumerate(records):
            f = tf.train.Example.FromString(record).features.feature
            height = f[features.IMAGE_HEIGHT].int64_list.value[0]
            width = f[features.IMAGE_WIDTH].int64_list.value[0]
            masks = f[features.OBJECT_MASK_RLE].bytes_list.value
            labels = f[features.OBJECT_CLASS].int64_list.value
            if len(masks) != len(labels):
                raise ValueError(f"an example has {len(masks)} masks, {len(labels)} class labels")
            sources.append((record, height, width, masks))
            groups.setdefault(self.spec.pad_shape(height, width), []).append(index)
        results = [None] * len(records)
        for pad_shape, indices in groups.items():
            group = self._add_targets_padded([sources[i] for i in indices], variants, pad_shape)
            for index, result in zip(indices, group):
                results[index] = result
        return results

    def _add_targets_padded(self, sources, variants, pad_shape) -> list:
        """`add_targets_to_records` of `sources` ((record, height, width, mask RLEs) each) that
        share `pad_shape`, in one graph call."""
        rles, geometry = [], []  # geometry: one entry per job, record by record
        for _, height, width, masks in sources:
            geometry += [
                _variant_geometry(height, width, side, self.spec.max_size) for side, _ in variants
            ]
            rles += masks
        num_variants = len(variants)
        records = [record for record, *_ in sources]
        # Whole records: a string tensor copies them (fast); re-serializing the few features the
        # graph reads would cost more. The masks go as runs (`rle_runs`).
        outputs = self._targets_fn()(
            tf.constant(records, tf.string),
            *(tf.constant(array) for array in rle_runs(rles)),
            tf.constant(np.repeat(np.arange(len(records), dtype=np.int32), num_variants)),
            tf.constant([flip for _, flip in variants] * len(records), tf.bool),
            *_ragged_input([row_starts for _, _, row_starts, _ in geometry]),
            *_ragged_input([col_starts for *_, col_starts in geometry]),
            *(tf.constant(size, tf.int32) for size in pad_shape),
        )
        # Views of the outputs (`.numpy()` would copy them): they are only read.
        cell_class, cell_instance, packed, packed_splits, packed_shape, counts = (
            np.asarray(output) for output in outputs
        )
        results = []
        for i, record in enumerate(records):
            jobs = range(i * num_variants, (i + 1) * num_variants)
            tensors = {
                features.SOLO_CELL_CLASS: [cell_class[j] for j in jobs],
                features.SOLO_CELL_INSTANCE: [cell_instance[j] for j in jobs],
                features.SOLO_INSTANCE_MASKS: [
                    packed[packed_splits[j] : packed_splits[j + 1]].reshape(packed_shape[j])
                    for j in jobs
                ],
            }
            targets = self._targets_example(
                variants, [geometry[j] for j in jobs], tensors, pad_shape
            )
            canonical = collections.Counter(dict(zip(COUNT_NAMES, counts[jobs[0]].tolist())))
            results.append((record + targets, canonical))
        return results

    def _targets_example(self, variants, geometry, tensors: dict, pad_shape) -> bytes:
        """One example's target features as a serialized Example: its K `variants`, their
        `geometry` (`_variant_geometry` of each), `tensors` (feature key -> K arrays, one
        per variant) as `tf.io.serialize_tensor` bytes, and its `pad_shape` (height, width)."""
        targets = tf.train.Example()
        g = targets.features.feature
        g[features.SOLO_VARIANT_SHORT_SIDE].int64_list.value.extend(side for side, _ in variants)
        g[features.SOLO_VARIANT_FLIP].int64_list.value.extend(int(flip) for _, flip in variants)
        g[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value.extend(h for h, *_ in geometry)
        g[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value.extend(w for _, w, *_ in geometry)
        for key, arrays in tensors.items():
            g[key].bytes_list.value.extend(_serialize_tensor(array) for array in arrays)
        g[features.SOLO_PADDED_SIZE].int64_list.value.extend(pad_shape)
        # Deterministic: features in key order (the default order of a map can vary from one
        # message to the next), so the same example always gets the same bytes.
        return targets.SerializeToString(deterministic=True)

    def add_targets_to_record(
        self, record: bytes, variants: tuple[tuple[int, bool], ...] | None = None
    ) -> tuple[bytes, collections.Counter]:
        """Returns (the serialized example `record` with targets, counts of degenerate instances).

        What SoloTargetGen does per example (in batches, `add_targets_to_records`). The targets
        are appended as a second serialized Example holding only the new features: protobuf
        parses a concatenation as the merge of its parts, so the result reads as the input
        example plus the targets, and the input's bytes (mostly the JPEG) are copied once, not
        parsed and re-serialized.

        Degenerate instances are counted for the first (canonical) variant: `crowd` (never
        positive), `empty_mask` (zero pixels at the original size), `empty_after_resize`,
        and `no_positive_cells` (non-crowd, non-empty, yet no cell: scale outside every range or
        overwritten by later instances). They stay in the example; they are not dropped.
        """
        return self.add_targets_to_records([record], variants)[0]

    def add_targets(
        self, example: tf.train.Example, variants: tuple[tuple[int, bool], ...] | None = None
    ) -> tuple[tf.train.Example, collections.Counter]:
        """`add_targets_to_record` on a parsed example: (a copy with targets, counts)."""
        record, counts = self.add_targets_to_record(example.SerializeToString(), variants)
        return tf.train.Example.FromString(record), counts


def _degenerate_counts(
    is_crowd: tf.Tensor, targets: dict, instance_job: tf.Tensor, num_jobs: tf.Tensor
) -> tf.Tensor:
    """`[J, len(COUNT_NAMES)]` int32 counts of each job's instances (see `add_targets_to_record`).

    is_crowd `[N]` bool and instance_job `[N]` int32 (the job of each instance); `targets` as
    `compute_targets_from_runs_batch` returns them."""
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
    counts = tf.cast(tf.stack(counts, axis=1), tf.int32)  # [N, len(COUNT_NAMES)]
    return tf.math.unsorted_segment_sum(counts, instance_job, num_jobs)


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
    features.SOLO_PADDED_SIZE: tf.io.FixedLenFeature([2], tf.int64),
}


def decode_training_example(
    serialized: tf.Tensor,
    *,
    max_size: int,
    num_cells: int,
    random_variant: bool,
    seed=None,
    orientation_pad: bool = False,
) -> dict[str, tf.Tensor]:
    """One serialized SoloTargetGen example -> model input and targets (tf.data map function).

    Returns `images` [Ph, Pw, 3] float32 (normalised, padded), `cell_class` [num_cells] int32,
    `cell_instance` [num_cells] int32, `instance_masks` [N, Ph/4, Pw/4] uint8 (unpacked from the
    stored form, see `docs/CONTRACT.md`), `image_id` int64. The pad is the square
    P = padded_size(max_size) (static), or with `orientation_pad` the example's recorded
    `solo/padded_size` (its orientation rectangle; dynamic).
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
    recorded_pad = tf.cast(parsed[features.SOLO_PADDED_SIZE], tf.int32)  # [2]
    if orientation_pad:
        pad_height, pad_width = tf.unstack(recorded_pad)
    else:
        pad_height = pad_width = preprocess.padded_size(max_size)
        # Targets made for another pad would train the wrong cells without any other error.
        tf.debugging.assert_equal(
            recorded_pad,
            pad_height,
            message="the targets were made for another pad (orientation_pad on?)",
        )
    image = preprocess.decode_image(parsed[features.IMAGE_ENCODED])
    images, _ = preprocess.preprocess_image(
        image,
        short_side=tf.cast(short_sides[k], tf.int32),
        max_size=max_size,
        flip=flip,
        pad_shape=(pad_height, pad_width),
    )
    cell_class = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_CELL_CLASS])[k], tf.int32
    )
    cell_instance = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_CELL_INSTANCE])[k], tf.int32
    )
    packed_masks = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_INSTANCE_MASKS])[k], tf.uint8
    )
    instance_masks = unpack_masks(packed_masks, pad_height // 4, pad_width // 4)
    static = [None, None] if orientation_pad else [pad_height // 4, pad_width // 4]
    return {
        "images": images,
        "cell_class": tf.ensure_shape(cell_class, [num_cells]),
        "cell_instance": tf.ensure_shape(cell_instance, [num_cells]),
        "instance_masks": tf.ensure_shape(instance_masks, [None, *static]),
        "image_id": parsed[features.IMAGE_ID],
    }
