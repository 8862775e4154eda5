"""Real serving SavedModels with known answers, for evaluator tests.

`export_oracle_model` precomputes, per image of a list of examples, the ground-truth masks in the
serving layout (the inverse of `models.postprocess.paste_masks`: resize the original mask to the
resized size, pad to P, average down x4, quantise) and stores them in constant tables keyed by
image id. Its `serving_default` signature reads `image/encoded` for the image size (as a real
model does, giving `image_info`) and `image/id` to gather the precomputed detections, and returns
exactly the output dict of `docs/CONTRACT.md`. Images it does not know get no detections.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils

from models.postprocess import quantize_masks
from models.preprocess import decode_image, padded_size, resized_shape
from schemas import features

DEMO_SHORT_SIDE = 256  # demo_cpu test scale
DEMO_MAX_SIZE = 352


def serving_layout_masks(
    masks: np.ndarray, height: int, width: int, short_side: int, max_size: int
) -> np.ndarray:
    """`[N, H, W]` binary masks at the original size -> `[N, P/4, P/4]` uint8 serving masks."""
    size = padded_size(max_size)
    new_height, new_width = resized_shape(height, width, short_side, max_size)
    soft = tf.image.resize(
        tf.cast(masks[..., np.newaxis], tf.float32), tf.stack([new_height, new_width]), "bilinear"
    )
    soft = tf.image.pad_to_bounding_box(soft, 0, 0, size, size)
    quarter = tf.image.resize(soft, [size // 4, size // 4], method="area")
    return quantize_masks(quarter[..., 0]).numpy()


class _TableModel(tf.Module):
    """Detections looked up by image id; row `len(image_ids)` is the empty answer."""

    def __init__(self, image_ids, masks, scores, classes, category_ids, num_detections, **geometry):
        super().__init__()
        self._short_side = geometry["short_side"]
        self._max_size = geometry["max_size"]
        self.image_ids = tf.constant(image_ids, tf.int64)
        self.masks = tf.constant(masks, tf.uint8)
        self.scores = tf.constant(scores, tf.float32)
        self.classes = tf.constant(classes, tf.int32)
        self.category_ids = tf.constant(category_ids, tf.int32)
        self.num_detections = tf.constant(num_detections, tf.int32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples):
        parsed = tf.io.parse_example(
            examples,
            {
                features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
                features.IMAGE_ID: tf.io.FixedLenFeature([], tf.int64),
            },
        )
        original = tf.map_fn(
            lambda encoded: tf.shape(decode_image(encoded))[:2],
            parsed[features.IMAGE_ENCODED],
            fn_output_signature=tf.TensorSpec([2], tf.int32),
        )
        resized_height, resized_width = resized_shape(
            original[:, 0], original[:, 1], self._short_side, self._max_size
        )
        match = tf.equal(parsed[features.IMAGE_ID][:, tf.newaxis], self.image_ids[tf.newaxis, :])
        # A last always-true column: argmax picks the first match, else the empty row.
        match = tf.concat([match, tf.ones([tf.shape(match)[0], 1], tf.bool)], axis=1)
        rows = tf.argmax(tf.cast(match, tf.int32), axis=1, output_type=tf.int32)
        return {
            "masks": tf.gather(self.masks, rows),
            "scores": tf.gather(self.scores, rows),
            "classes": tf.gather(self.classes, rows),
            "category_ids": tf.gather(self.category_ids, rows),
            "num_detections": tf.gather(self.num_detections, rows),
            "image_info": tf.stack(
                [original[:, 0], original[:, 1], resized_height, resized_width], axis=1
            ),
        }


def _values(example: tf.train.Example, key: str) -> list:
    feature = example.features.feature[key]
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def export_oracle_model(
    examples: Sequence[tf.train.Example],
    export_dir: str,
    *,
    keep_every: int = 1,
    short_side: int = DEMO_SHORT_SIDE,
    max_size: int = DEMO_MAX_SIZE,
) -> str:
    """Saves a model that returns the ground truth of `examples` as its detections.

    Every non-crowd object becomes one detection (score 0.99, 0.98, ... in stored order) with
    its contiguous class and COCO id; crowd regions are not detected. `keep_every=k` keeps only
    objects 0, k, 2k, ... of each image (k=2 drops half: a "noisy" oracle with lower recall).
    Returns `export_dir`.
    """
    per_image = []
    for example in examples:
        height = _values(example, features.IMAGE_HEIGHT)[0]
        width = _values(example, features.IMAGE_WIDTH)[0]
        objects = [
            (rle, cls, cid)
            for rle, cls, cid, crowd in zip(
                _values(example, features.OBJECT_MASK_RLE),
                _values(example, features.OBJECT_CLASS),
                _values(example, features.OBJECT_CATEGORY_ID),
                _values(example, features.OBJECT_IS_CROWD),
            )
            if not crowd
        ][::keep_every]
        masks = np.stack(
            [mask_utils.decode({"size": [height, width], "counts": rle}) for rle, _, _ in objects]
            or [np.zeros((height, width), np.uint8)]
        )
        per_image.append(
            (
                _values(example, features.IMAGE_ID)[0],
                serving_layout_masks(masks, height, width, short_side, max_size)[: len(objects)],
                [cls for _, cls, _ in objects],
                [cid for _, _, cid in objects],
            )
        )
    return _export(per_image, export_dir, short_side=short_side, max_size=max_size)


def export_empty_model(
    export_dir: str, *, short_side: int = DEMO_SHORT_SIDE, max_size: int = DEMO_MAX_SIZE
) -> str:
    """Saves a model that detects nothing (num_detections 0) on every image."""
    return _export([], export_dir, short_side=short_side, max_size=max_size)


def _export(per_image, export_dir: str, *, short_side: int, max_size: int) -> str:
    quarter = padded_size(max_size) // 4
    k = max([len(classes) for _, _, classes, _ in per_image] + [1])
    rows = len(per_image) + 1  # The last row answers unknown images: nothing detected.
    masks = np.zeros((rows, k, quarter, quarter), np.uint8)
    scores = np.zeros((rows, k), np.float32)
    classes = np.full((rows, k), -1, np.int32)
    category_ids = np.full((rows, k), -1, np.int32)
    num_detections = np.zeros(rows, np.int32)
    for row, (_, image_masks, image_classes, image_category_ids) in enumerate(per_image):
        n = len(image_classes)
        masks[row, :n] = image_masks
        scores[row, :n] = 0.99 - 0.01 * np.arange(n)
        classes[row, :n] = image_classes
        category_ids[row, :n] = image_category_ids
        num_detections[row] = n
    module = _TableModel(
        np.array([image_id for image_id, *_ in per_image], np.int64),
        masks,
        scores,
        classes,
        category_ids,
        num_detections,
        short_side=short_side,
        max_size=max_size,
    )
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    return export_dir
