"""Model-independent evaluation loop: a serving SavedModel + an Examples split -> COCO mask AP.

The loop knows the SavedModel only through the `serving_default` contract of
`docs/CONTRACT.md` (serialized tf.Examples in; fixed-size `masks`, `scores`, `classes`,
`category_ids`, `num_detections`, `image_info` out) and the examples only through
`schemas/features.py`. Ground truth comes from each example itself (RLE, stored area, crowd flag,
COCO category and annotation ids), so what COCOeval sees is exactly what ingestion stored.
Detections are mapped back to the original image with `models.postprocess.paste_masks`, the one
mapping shared with predict and the tests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from components.mask_evaluator.coco_metrics import CocoMaskEvaluator
from models.postprocess import paste_masks
from schemas import features

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT_KEY = "examples"
# Masks pasted per call: paste_masks holds K float32 masks at the padded input size
# (100 x 1344^2 x 4 bytes = 720 MB for the official test scale), so paste in chunks.
PASTE_CHUNK = 16


def load_category_map(examples_uri: str) -> list[dict[str, Any]]:
    """The `[{"index", "coco_id", "name"}, ...]` records of an Examples artifact's category map."""
    path = os.path.join(examples_uri, features.CATEGORY_MAP_FILENAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: the Examples artifact must come from CocoExampleGen (or a "
            "component that copies its category map, such as SoloTargetGen)."
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)["categories"]


def ground_truth_from_example(
    example: tf.train.Example,
) -> tuple[int, int, int, list[dict[str, Any]]]:
    """`(image_id, height, width, annotations)` for `CocoMaskEvaluator.add_ground_truth`.

    Annotations carry the stored values unchanged: compressed RLE counts (bytes), `area` as
    stored, `iscrowd`, the original COCO `category_id` and the COCO annotation `id`.
    """
    feature = example.features.feature

    def values(key: str) -> list:
        kind = feature[key].WhichOneof("kind")
        return list(getattr(feature[key], kind).value) if kind else []

    image_id = values(features.IMAGE_ID)[0]
    height = values(features.IMAGE_HEIGHT)[0]
    width = values(features.IMAGE_WIDTH)[0]
    rles = values(features.OBJECT_MASK_RLE)
    category_ids = values(features.OBJECT_CATEGORY_ID)
    areas = values(features.OBJECT_AREA)
    crowd = values(features.OBJECT_IS_CROWD)
    ann_ids = values(features.OBJECT_ANNOTATION_ID) or [None] * len(rles)
    lengths = {len(rles), len(category_ids), len(areas), len(crowd), len(ann_ids)}
    if len(lengths) != 1:
        raise ValueError(f"image {image_id}: per-object feature lists differ in length")
    annotations = [
        {
            "id": ann_id,
            "category_id": category_id,
            "rle": {"size": [height, width], "counts": rle},
            "area": area,
            "iscrowd": is_crowd,
        }
        for rle, category_id, area, is_crowd, ann_id in zip(
            rles, category_ids, areas, crowd, ann_ids
        )
    ]
    return image_id, height, width, annotations


@tf.function(reduce_retracing=True)
def _paste(masks: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
    return paste_masks(masks, image_info)


def evaluate_saved_model(
    saved_model_dir: str,
    examples_file_pattern: str,
    category_map: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Runs a serving SavedModel over one split and computes COCO mask AP and box-from-mask AP.

    Args:
      saved_model_dir: SavedModel with the `serving_default` signature of `docs/CONTRACT.md`.
      examples_file_pattern: glob of the split's gzip TFRecord files (`<uri>/Split-eval/*`).
      category_map: the records of `category_map.json` (`[{"index", "coco_id", "name"}]`, or
        the whole file's dict); None takes categories from the ids seen, without names. When
        given, every detection's `category_ids` must equal the map's id for its `classes`.
      batch_size: serialized examples per signature call.

    Returns:
      `CocoMaskEvaluator.evaluate()` output (`segm`, `bbox`, `per_category`, `precision`,
      `detections`, `summary`) plus `num_images`, `num_annotations`, `num_detections` and
      `timing` (seconds: `model_load`, `inference`, `postprocess`, `cocoeval`, `total`;
      `images_per_second` over inference + postprocess).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    files = sorted(tf.io.gfile.glob(examples_file_pattern))
    if not files:
        raise FileNotFoundError(f"no files match {examples_file_pattern}")

    if isinstance(category_map, Mapping):
        category_map = category_map["categories"]
    coco_id_by_index = None
    categories = None
    if category_map is not None:
        categories = [{"id": int(c["coco_id"]), "name": c["name"]} for c in category_map]
        coco_id_by_index = np.full(max(int(c["index"]) for c in category_map) + 1, -1, np.int64)
        for c in category_map:
            coco_id_by_index[int(c["index"])] = int(c["coco_id"])
    evaluator = CocoMaskEvaluator(categories=categories)

    loaded = tf.saved_model.load(saved_model_dir)
    serve = loaded.signatures[SERVING_SIGNATURE]
    model_load = time.perf_counter() - start

    inference = postprocess = 0.0
    num_images = num_annotations = num_detections = 0
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size)
    for batch in dataset:
        tick = time.perf_counter()
        outputs = {k: v.numpy() for k, v in serve(**{SERVING_INPUT_KEY: batch}).items()}
        tock = time.perf_counter()
        inference += tock - tick
        for i, serialized in enumerate(batch.numpy()):
            image_id, height, width, annotations = ground_truth_from_example(
                tf.train.Example.FromString(serialized)
            )
            evaluator.add_ground_truth(image_id, height, width, annotations)
            num_images += 1
            num_annotations += len(annotations)

            image_info = outputs["image_info"][i]
            if (int(image_info[0]), int(image_info[1])) != (height, width):
                raise ValueError(
                    f"image {image_id}: the model saw a {image_info[0]}x{image_info[1]} image, "
                    f"the example declares {height}x{width}"
                )
            n = int(outputs["num_detections"][i])
            if n == 0:
                continue
            classes = outputs["classes"][i, :n]
            category_ids = outputs["category_ids"][i, :n]
            if coco_id_by_index is not None:
                mapped = coco_id_by_index[np.clip(classes, 0, len(coco_id_by_index) - 1)]
                bad = (classes < 0) | (classes >= len(coco_id_by_index)) | (mapped != category_ids)
                if bad.any():
                    raise ValueError(
                        f"image {image_id}: detection classes {classes[bad].tolist()} / "
                        f"category_ids {category_ids[bad].tolist()} disagree with the category map"
                    )
            info = tf.constant(image_info, tf.int32)
            binary = np.concatenate(
                [
                    _paste(tf.constant(outputs["masks"][i, j : min(j + PASTE_CHUNK, n)]), info)
                    for j in range(0, n, PASTE_CHUNK)
                ]
            )
            evaluator.add_detections(
                image_id,
                [
                    {"category_id": int(c), "score": float(s), "mask": m}
                    for c, s, m in zip(category_ids, outputs["scores"][i, :n], binary)
                ],
            )
            num_detections += n
        postprocess += time.perf_counter() - tock

    tick = time.perf_counter()
    result = evaluator.evaluate()
    cocoeval = time.perf_counter() - tick
    total = time.perf_counter() - start
    result.update(
        num_images=num_images,
        num_annotations=num_annotations,
        num_detections=num_detections,
        timing={
            "model_load": model_load,
            "inference": inference,
            "postprocess": postprocess,
            "cocoeval": cocoeval,
            "total": total,
            "images_per_second": num_images / max(inference + postprocess, 1e-9),
        },
    )
    return result
