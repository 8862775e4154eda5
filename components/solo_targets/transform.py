"""Per-example SOLO target materialisation (Beam side) and the one training decoder (tf.data side).

`TargetMaker.add_targets` takes a CocoExampleGen tf.Example and returns it with K target
variants added (see `docs/CONTRACT.md` and the `SOLO_*` keys in `schemas/features.py`), plus a
count of degenerate instances for the component report. `decode_training_example` is the only
code that reads those features back, inside tf.data.

Why variants rather than online recomputation: horizontal flip (on in every official recipe) and
multi-scale resize both change which cells an object occupies, so targets cannot be flipped or
rescaled after the fact. Materialising (short side x flip) variants in Beam keeps training free
of assignment work and keeps the augmentation random per step (the trainer draws a variant per
image per step), at the cost of K copies of the 1/4-scale masks (gzip-compressed binary maps).
`benchmarks/targets.py` and `benchmarks/solo_targets.py` measure the costs.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils

from models import preprocess
from models.targets import compute_targets
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
    """[N, H, W] uint8 masks from the example's compressed RLE."""
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


class TargetMaker:
    """Adds SOLO target variants to CocoExampleGen examples. Build once per worker."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self._variant_fn = tf.function(
            self._variant,
            input_signature=[
                tf.TensorSpec([None, None, None], tf.uint8),  # masks [N, H, W]
                tf.TensorSpec([None, 4], tf.float32),  # boxes xyxy, original pixels
                tf.TensorSpec([None], tf.int32),  # classes
                tf.TensorSpec([None], tf.bool),  # crowd
                tf.TensorSpec([], tf.int32),  # short side
                tf.TensorSpec([], tf.bool),  # flip
            ],
        )

    def _variant(self, masks, boxes_xyxy, classes, is_crowd, short_side, flip):
        spec = self.spec
        height, width = tf.shape(masks)[1], tf.shape(masks)[2]
        new_h, new_w = preprocess.resized_shape(height, width, short_side, spec.max_size)
        resized = preprocess.resize_masks(masks, new_h, new_w)
        scale_x = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
        scale_y = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
        xmin, ymin = boxes_xyxy[:, 0] * scale_x, boxes_xyxy[:, 1] * scale_y
        xmax, ymax = boxes_xyxy[:, 2] * scale_x, boxes_xyxy[:, 3] * scale_y
        new_w_f = tf.cast(new_w, tf.float32)
        xmin, xmax = (
            tf.where(flip, new_w_f - xmax, xmin),
            tf.where(flip, new_w_f - xmin, xmax),
        )
        resized = tf.cond(flip, lambda: tf.reverse(resized, axis=[2]), lambda: resized)
        padded = preprocess.pad_to(resized, spec.pad)
        targets = compute_targets(
            tf.stack([ymin, xmin, ymax, xmax], axis=1),
            classes,
            padded,
            is_crowd,
            grids=spec.grids,
            scale_ranges=spec.scale_ranges,
            sigma=spec.sigma,
        )
        empty_after_resize = tf.reduce_sum(tf.cast(resized, tf.int32), axis=[1, 2]) == 0
        return targets, new_h, new_w, empty_after_resize

    def add_targets(
        self, example: tf.train.Example, variants: tuple[tuple[int, bool], ...] | None = None
    ) -> tuple[tf.train.Example, collections.Counter]:
        """Returns (a copy of `example` with targets, counts of degenerate instances).

        Degenerate instances are counted for the first (canonical) variant: `crowd` (never
        positive), `empty_mask` (zero pixels at the original size), `empty_after_resize`,
        and `no_positive_cells` (non-crowd, non-empty, yet no cell: scale outside every range or
        overwritten by later instances). They stay in the example; they are not dropped.
        """
        variants = variants or self.spec.variants
        f = example.features.feature
        masks = decode_rle_masks(example)
        boxes = np.stack(
            [np.asarray(f[k].float_list.value, np.float32) for k in features.OBJECT_BOX_KEYS],
            axis=1,
        ).reshape(-1, 4)
        classes = np.asarray(f[features.OBJECT_CLASS].int64_list.value, np.int32)
        is_crowd = np.asarray(f[features.OBJECT_IS_CROWD].int64_list.value, np.int64) == 1

        out = tf.train.Example()
        out.CopyFrom(example)
        g = out.features.feature
        counts = collections.Counter(instances=len(classes))
        for k, (short_side, flip) in enumerate(variants):
            targets, new_h, new_w, empty_after = self._variant_fn(
                masks, boxes, classes, is_crowd, tf.constant(short_side), tf.constant(flip)
            )
            g[features.SOLO_VARIANT_SHORT_SIDE].int64_list.value.append(short_side)
            g[features.SOLO_VARIANT_FLIP].int64_list.value.append(int(flip))
            g[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value.append(int(new_h))
            g[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value.append(int(new_w))
            for key, name in (
                (features.SOLO_CELL_CLASS, "cell_class"),
                (features.SOLO_CELL_INSTANCE, "cell_instance"),
                (features.SOLO_INSTANCE_MASKS, "instance_masks"),
            ):
                g[key].bytes_list.value.append(tf.io.serialize_tensor(targets[name]).numpy())
            if k == 0:
                num_cells = targets["instance_num_cells"].numpy()
                empty = masks.reshape(len(masks), -1).sum(axis=1) == 0
                empty_after = empty_after.numpy()
                counts["crowd"] += int(is_crowd.sum())
                counts["empty_mask"] += int((empty & ~is_crowd).sum())
                counts["empty_after_resize"] += int((empty_after & ~empty & ~is_crowd).sum())
                counts["no_positive_cells"] += int(
                    ((num_cells == 0) & ~empty_after & ~is_crowd).sum()
                )
                counts["positive_instances"] += int((num_cells > 0).sum())
        g[features.SOLO_PADDED_SIZE].int64_list.value.append(self.spec.pad)
        return out, counts


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
    `cell_instance` [num_cells] int32, `instance_masks` [N, P/4, P/4] uint8, `image_id` int64.
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
    instance_masks = tf.io.parse_tensor(
        tf.sparse.to_dense(parsed[features.SOLO_INSTANCE_MASKS])[k], tf.uint8
    )
    return {
        "images": images,
        "cell_class": tf.ensure_shape(cell_class, [num_cells]),
        "cell_instance": tf.ensure_shape(cell_instance, [num_cells]),
        "instance_masks": tf.ensure_shape(instance_masks, [None, pad // 4, pad // 4]),
        "image_id": parsed[features.IMAGE_ID],
    }
