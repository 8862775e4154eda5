"""SavedModel export with the two serving signatures of docs/CONTRACT.md.

Both signatures run the same graph: decode each encoded image -> `models.preprocess.preprocess_image`
at the test scale (the ONE preprocessing, also used by the training decoder) -> batch ->
`model(training=False)` -> `models.postprocess.detect` with the config's thresholds ->
`quantize_masks`. Outputs are fixed-size and batch-major (K = max detections, P = pad):

    masks           [B, K, P/4, P/4] uint8   round(255 * soft mask)
    scores          [B, K]           float32 0 where padded
    classes         [B, K]           int32   contiguous class, -1 where padded
    category_ids    [B, K]           int32   original COCO id, -1 where padded
    num_detections  [B]              int32
    image_info      [B, 4]           int32   original h, w, resized h, w

`serving_default` takes `examples` `[None]` serialized tf.Example (only `image/encoded` is read);
`serving_bytes` takes `images` `[None]` encoded JPEG/PNG. The category map travels with the model:
as the `category_ids` / `class_names` variables of the loaded object and as
`assets.extra/category_map.json` (ignored by TF Serving).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import tensorflow as tf

from models import postprocess, preprocess
from models.config import ModelConfig
from schemas import features

SIGNATURE_EXAMPLES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
CATEGORY_MAP_ASSET = os.path.join("assets.extra", features.CATEGORY_MAP_FILENAME)


def serving_inputs(encoded: tf.Tensor, model_config: ModelConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """`[B]` encoded images -> (model input `[B, P, P, 3]` float32, image_info `[B, 4]` int32).

    The training decoder's eval variant (test short side, no flip) gives the same model input.
    """
    size = preprocess.padded_size(model_config.image_max_size)

    def one(image_bytes):
        image = preprocess.decode_image(image_bytes)
        inputs, resized = preprocess.preprocess_image(
            image, short_side=model_config.image_short_side, max_size=model_config.image_max_size
        )
        info = tf.concat([tf.shape(image)[:2], resized], axis=0)
        return inputs, tf.cast(info, tf.int32)

    return tf.map_fn(
        one,
        encoded,
        fn_output_signature=(
            tf.TensorSpec([size, size, 3], tf.float32),
            tf.TensorSpec([4], tf.int32),
        ),
    )


def normalize_category_map(category_map, num_classes: int) -> list[dict]:
    """`category_map.json` content (dict with "categories", or its list) -> records by index.

    None gives placeholder records (COCO id = index, name = "class_<index>").
    """
    if category_map is None:
        return [{"index": i, "coco_id": i, "name": f"class_{i}"} for i in range(num_classes)]
    records = category_map["categories"] if isinstance(category_map, Mapping) else category_map
    records = sorted(records, key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in records] != list(range(num_classes)):
        raise ValueError(f"category map does not cover classes 0..{num_classes - 1}: {records}")
    return [
        {"index": int(r["index"]), "coco_id": int(r["coco_id"]), "name": str(r["name"])}
        for r in records
    ]


class SOLOv2Serving(tf.Module):
    """The exported object: the model, its category map and the two signature functions."""

    def __init__(self, model, model_config: ModelConfig, category_map: Sequence[dict]):
        super().__init__(name="solov2_serving")
        self.model = model
        self._model_config = model_config
        self.category_ids = tf.Variable(
            [r["coco_id"] for r in category_map], dtype=tf.int32, trainable=False
        )
        self.class_names = tf.Variable(
            [r["name"] for r in category_map], dtype=tf.string, trainable=False
        )

    def detect_encoded(self, encoded: tf.Tensor) -> dict[str, tf.Tensor]:
        """`[B]` encoded images -> the serving outputs (see the module docstring)."""
        config = self._model_config
        images, image_info = serving_inputs(encoded, config)
        outputs = self.model(images, training=False)
        detections = postprocess.detect(
            outputs["category_logits"],
            outputs["kernels"],
            outputs["mask_features"],
            grids=config.grids,
            strides=config.strides,
            score_threshold=config.score_threshold,
            mask_threshold=config.mask_threshold,
            nms_pre=config.nms_pre,
            update_threshold=config.update_threshold,
            max_detections=config.max_detections,
            nms_kernel=config.nms_kernel,
            nms_sigma=config.nms_sigma,
        )
        classes = detections["classes"]
        category_ids = tf.where(
            classes >= 0, tf.gather(self.category_ids, tf.maximum(classes, 0)), -1
        )
        quarter = preprocess.padded_size(config.image_max_size) // 4
        k = config.max_detections
        return {
            "masks": tf.ensure_shape(
                postprocess.quantize_masks(detections["masks"]), [None, k, quarter, quarter]
            ),
            "scores": tf.ensure_shape(detections["scores"], [None, k]),
            "classes": tf.ensure_shape(classes, [None, k]),
            "category_ids": tf.ensure_shape(category_ids, [None, k]),
            "num_detections": tf.ensure_shape(detections["num_detections"], [None]),
            "image_info": tf.ensure_shape(image_info, [None, 4]),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples):
        parsed = tf.io.parse_example(
            examples, {features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string)}
        )
        return self.detect_encoded(parsed[features.IMAGE_ENCODED])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_images(self, images):
        return self.detect_encoded(images)


def export_saved_model(
    model, model_config: ModelConfig, serving_dir: str, category_map=None
) -> SOLOv2Serving:
    """Saves `model` with `serving_default` and `serving_bytes` to `serving_dir`.

    Args:
      model: a built SOLOv2 (float32 recommended; see `models.train` for mixed precision).
      model_config: its ModelConfig (test-time resize and inference thresholds).
      serving_dir: output folder (e.g. `fn_args.serving_model_dir`).
      category_map: `category_map.json` content (dict or its "categories" list), or None.

    Returns the saved module (its functions match the saved signatures).
    """
    records = normalize_category_map(category_map, model_config.num_classes)
    module = SOLOv2Serving(model, model_config, records)
    tf.saved_model.save(
        module,
        serving_dir,
        signatures={
            SIGNATURE_EXAMPLES: module.serve_examples.get_concrete_function(),
            SIGNATURE_BYTES: module.serve_images.get_concrete_function(),
        },
    )
    asset = os.path.join(serving_dir, CATEGORY_MAP_ASSET)
    tf.io.gfile.makedirs(os.path.dirname(asset))
    with tf.io.gfile.GFile(asset, "w") as f:
        json.dump({"categories": records}, f, indent=1)
    return module
