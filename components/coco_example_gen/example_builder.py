"""Turning one `ImageTask` into one tf.Example (or a rejection), one image at a time.

The image is checked in this order: the file name stays inside the image root, the file
exists, its header-declared pixel count is under the limit (checked before any pixel is
decoded, so decompression bombs never reach memory), it decodes completely, and its size
matches the JSON. RGB JPEGs are stored byte for byte; anything else (grayscale, CMYK,
palette, PNG, ...) is converted to RGB and re-encoded (PNG stays PNG, losslessly).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from components.coco_example_gen.coco_reader import (
    ImageTask,
    Reason,
    Rejection,
    resolve_image_path,
)
from schemas import features

# Default refusal threshold: 64 megapixels (COCO images are about 0.3 MP).
DEFAULT_MAX_PIXELS = 64_000_000
JPEG_REENCODE_QUALITY = 95


@dataclasses.dataclass
class BuiltExample:
    """A written image: its serialized tf.Example and what it holds, for the report."""

    split: str
    image_id: int
    num_annotations: int
    serialized: bytes


def _reject_image(task: ImageTask, reason: Reason, detail: str) -> list[Rejection]:
    """The image rejection plus one `image_rejected` entry per annotation it carried."""
    rejections = [
        Rejection(
            "image", task.split, reason, detail, image_id=task.image_id, file_name=task.file_name
        )
    ]
    rejections += [
        Rejection(
            "annotation",
            task.split,
            Reason.IMAGE_REJECTED,
            f"its image was rejected ({reason.value})",
            image_id=task.image_id,
            annotation_id=int(ann["id"]),
        )
        for ann in task.annotations
    ]
    return rejections


def load_image(
    task: ImageTask, image_root: str, max_pixels: int
) -> tuple[bytes, str] | tuple[None, tuple[Reason, str]]:
    """Reads and checks the image file; returns (encoded RGB bytes, format) or (None, problem)."""
    path = resolve_image_path(image_root, task.file_name)
    if path is None:
        return None, (Reason.UNSAFE_FILE_NAME, f"{task.file_name!r} escapes the image root")
    if not tf.io.gfile.exists(path):
        return None, (Reason.MISSING_FILE, f"{path} does not exist")
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size  # From the header only; nothing decoded yet.
            if width * height > max_pixels:
                return None, (
                    Reason.TOO_MANY_PIXELS,
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                )
            image_format = (image.format or "").lower()
            image.load()  # Full decode: raises on truncated or corrupt data.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, (Reason.TOO_MANY_PIXELS, str(e))
    except Exception as e:  # PIL raises many types for bad data.
        return None, (Reason.CORRUPT_IMAGE, f"cannot decode {path}: {type(e).__name__}: {e}")
    if (width, height) != (task.width, task.height):
        return None, (
            Reason.SIZE_MISMATCH,
            f"file is {width}x{height}, JSON says {task.width}x{task.height}",
        )
    if image_format == "jpeg" and image.mode == "RGB":
        return raw, "jpeg"
    rgb = image.convert("RGB")
    out = io.BytesIO()
    if image_format == "png":
        rgb.save(out, format="PNG")
        return out.getvalue(), "png"
    rgb.save(out, format="JPEG", quality=JPEG_REENCODE_QUALITY)
    return out.getvalue(), "jpeg"


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> bytes:
    """COCO polygon(s) or RLE -> compressed RLE counts at the image size.

    Polygons and multi-part polygons are rasterised and merged exactly as pycocotools'
    `annToRLE` does; uncompressed crowd RLE is compressed (same pixels); compressed RLE is kept.
    """
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
    counts = rle["counts"]
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


def _int_feature(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _float_feature(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _bytes_feature(values) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def build_example(
    task: ImageTask,
    image_root: str,
    class_index_by_coco_id: dict[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[BuiltExample | None, list[Rejection]]:
    """Builds the tf.Example for one image, or reports why it (and its annotations) was not."""
    encoded, problem = load_image(task, image_root, max_pixels)
    if encoded is None:
        return None, _reject_image(task, *problem)
    image_format = problem  # On success the second item is the format.

    rejections: list[Rejection] = []
    kept: list[tuple[dict[str, Any], bytes]] = []
    for ann in task.annotations:
        try:
            rle = segmentation_to_rle(ann["segmentation"], task.height, task.width)
        except Exception as e:  # pycocotools raises on malformed polygons/RLE strings.
            rejections.append(
                Rejection(
                    "annotation",
                    task.split,
                    Reason.INVALID_SEGMENTATION,
                    f"pycocotools cannot decode it: {e}",
                    image_id=task.image_id,
                    annotation_id=int(ann["id"]),
                )
            )
            continue
        kept.append((ann, rle))

    boxes = np.array([ann["bbox"] for ann, _ in kept], dtype=np.float64).reshape(-1, 4)
    xmin, ymin = boxes[:, 0], boxes[:, 1]
    xmax, ymax = boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
    feature = {
        features.IMAGE_ENCODED: _bytes_feature([encoded]),
        features.IMAGE_FORMAT: _bytes_feature([image_format.encode()]),
        features.IMAGE_HEIGHT: _int_feature([task.height]),
        features.IMAGE_WIDTH: _int_feature([task.width]),
        features.IMAGE_ID: _int_feature([task.image_id]),
        features.IMAGE_FILENAME: _bytes_feature([task.file_name.encode("utf-8")]),
        features.OBJECT_CLASS: _int_feature(
            class_index_by_coco_id[int(ann["category_id"])] for ann, _ in kept
        ),
        features.OBJECT_CATEGORY_ID: _int_feature(int(ann["category_id"]) for ann, _ in kept),
        features.OBJECT_XMIN: _float_feature(np.clip(xmin, 0, task.width)),
        features.OBJECT_YMIN: _float_feature(np.clip(ymin, 0, task.height)),
        features.OBJECT_XMAX: _float_feature(np.clip(xmax, 0, task.width)),
        features.OBJECT_YMAX: _float_feature(np.clip(ymax, 0, task.height)),
        features.OBJECT_IS_CROWD: _int_feature(int(ann.get("iscrowd", 0)) for ann, _ in kept),
        features.OBJECT_AREA: _float_feature(float(ann["area"]) for ann, _ in kept),
        features.OBJECT_ANNOTATION_ID: _int_feature(int(ann["id"]) for ann, _ in kept),
        features.OBJECT_MASK_RLE: _bytes_feature(rle for _, rle in kept),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    built = BuiltExample(task.split, task.image_id, len(kept), example.SerializeToString())
    return built, rejections
