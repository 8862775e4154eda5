"""Reading and validating a COCO instances JSON, independent of Beam and TFX.

`read_coco_json` loads one annotation file and `index_coco` checks it record by record. Every
image and every annotation either ends up in an `ImageTask` (to be written) or in a `Rejection`
(reported with a reason); nothing is dropped silently. Checks that need the image file (missing,
corrupt, oversized, wrong size) happen later, in `example_builder`, one image at a time.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import pickle
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tensorflow as tf


class Reason(str, enum.Enum):
    """Why an image or an annotation was not written. The values appear in the report."""

    # Images.
    INVALID_IMAGE_RECORD = "invalid_image_record"
    DUPLICATE_IMAGE_ID = "duplicate_image_id"
    UNSAFE_FILE_NAME = "unsafe_file_name"
    MISSING_FILE = "missing_file"
    TOO_MANY_PIXELS = "too_many_pixels"
    CORRUPT_IMAGE = "corrupt_image"
    SIZE_MISMATCH = "size_mismatch"
    # Annotations.
    INVALID_ANNOTATION_RECORD = "invalid_annotation_record"
    DUPLICATE_ANNOTATION_ID = "duplicate_annotation_id"
    UNKNOWN_IMAGE = "unknown_image"
    UNKNOWN_CATEGORY = "unknown_category"
    DEGENERATE_POLYGON = "degenerate_polygon"
    INVALID_SEGMENTATION = "invalid_segmentation"
    ZERO_AREA_BOX = "zero_area_box"
    BOX_OUTSIDE_IMAGE = "box_outside_image"
    IMAGE_REJECTED = "image_rejected"


@dataclasses.dataclass(frozen=True)
class Rejection:
    """One image or annotation that was not written, and why."""

    kind: str  # "image" or "annotation".
    split: str
    reason: Reason
    detail: str
    image_id: int | None = None
    annotation_id: int | None = None
    file_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["reason"] = self.reason.value
        return {k: v for k, v in record.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Category:
    index: int  # Contiguous class index in [0, num_classes).
    coco_id: int
    name: str


@dataclasses.dataclass(frozen=True)
class CategoryMap:
    """Contiguous class index <-> COCO category id <-> name, ordered by COCO id."""

    categories: tuple[Category, ...]

    @classmethod
    def from_coco_categories(cls, records: Iterable[dict[str, Any]]) -> CategoryMap:
        by_id: dict[int, str] = {}
        for record in records:
            coco_id, name = int(record["id"]), str(record.get("name", record["id"]))
            if by_id.get(coco_id, name) != name:
                raise ValueError(
                    f"category id {coco_id} has two names: {by_id[coco_id]!r} and {name!r}"
                )
            by_id[coco_id] = name
        return cls(tuple(Category(i, cid, by_id[cid]) for i, cid in enumerate(sorted(by_id))))

    @property
    def index_by_coco_id(self) -> dict[int, int]:
        return {c.coco_id: c.index for c in self.categories}

    def to_json(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(c) for c in self.categories]

    @classmethod
    def from_json(cls, records: Sequence[dict[str, Any]]) -> CategoryMap:
        return cls(tuple(Category(int(r["index"]), int(r["coco_id"]), r["name"]) for r in records))

    def __len__(self) -> int:
        return len(self.categories)


@dataclasses.dataclass
class ImageTask:
    """An image record from the JSON with its valid annotations, ready for the image checks.

    Tasks are pickled into the executor's task files (and by Beam, should one be shuffled), so
    pickling them also compresses their pickled annotations: a demo image's take 2.2 KB instead
    of 9.1 KB, a COCO image's 2.1 KB instead of 5.0 KB.
    """

    split: str
    image_id: int
    file_name: str
    height: int
    width: int
    annotations: list[dict[str, Any]]

    def __getstate__(self) -> dict[str, Any]:
        packed = pickle.dumps(self.annotations, pickle.HIGHEST_PROTOCOL)
        return {**self.__dict__, "annotations": zlib.compress(packed, 1)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        annotations = pickle.loads(zlib.decompress(state["annotations"]))
        self.__dict__.update({**state, "annotations": annotations})


def pack_annotation(record: dict[str, Any]) -> bytes:
    """An annotation record as compressed pickle bytes: exact (1 stays 1, -0.0 stays -0.0)."""
    return zlib.compress(pickle.dumps(record, pickle.HIGHEST_PROTOCOL), 1)


def unpack_annotation(record: Any) -> Any:
    """Undoes `pack_annotation`; anything else (a record as parsed) is returned as it is."""
    return pickle.loads(zlib.decompress(record)) if isinstance(record, bytes) else record


def _drop_annotation_records(record: dict[str, Any]) -> dict[str, Any] | None:
    return None if "image_id" in record else record


def _pack_annotation_records(record: dict[str, Any]) -> dict[str, Any] | bytes:
    return pack_annotation(record) if "image_id" in record else record


# `GFile.read()` of a whole file peaks at three times its size; reading in pieces of this size
# and joining them peaks at twice (the pieces and the joined copy), as does decoding the text.
_READ_CHUNK_BYTES = 1 << 20


def _read_bytes(path: str) -> bytes:
    chunks = []
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK_BYTES):
            chunks.append(chunk)
    return b"".join(chunks)


def read_coco_json(path: str, *, annotations: bool = True, packed: bool = False) -> dict[str, Any]:
    """Loads a COCO instances JSON; malformed files fail with the file name and position.

    Polygons are most of a parsed COCO file (35 KB per demo image as Python objects, against
    0.4 KB without them and 6.2 KB of JSON text), so the parse need not hold them all:

    - `annotations=False`: each annotation record (a dict with an `image_id`) is dropped as soon
      as it is parsed, and `annotations` holds one None per record. For a pass that needs only
      the images and categories.
    - `packed=True`: each annotation record is replaced by `pack_annotation(record)` as soon as
      it is parsed (2.6 KB per demo image). `index_coco` unpacks them one at a time.
    """
    raw = _read_bytes(path)
    hook = None
    if not annotations:
        hook = _drop_annotation_records
    elif packed:
        hook = _pack_annotation_records
    try:
        # Decoded here, as `json.loads` would, so that the bytes are freed before parsing.
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        del raw
        data = json.loads(text, object_hook=hook)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start}: {e.reason}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object at the top level, got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or invalid '{key}' list")
    return data


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _check_segmentation(segmentation: Any, height: int, width: int) -> tuple[Reason, str] | None:
    """Returns (reason, detail) when the segmentation cannot be turned into a mask."""
    if isinstance(segmentation, list):
        if not segmentation:
            return Reason.DEGENERATE_POLYGON, "empty polygon list"
        for part in segmentation:
            if not isinstance(part, list) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in part
            ):
                return Reason.INVALID_SEGMENTATION, "polygon is not a list of numbers"
            if len(part) % 2:
                return (
                    Reason.INVALID_SEGMENTATION,
                    f"polygon has an odd number ({len(part)}) of coordinates",
                )
            if len(part) < 6:
                return Reason.DEGENERATE_POLYGON, f"polygon has {len(part) // 2} point(s), needs 3"
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or counts is None:
            return Reason.INVALID_SEGMENTATION, "RLE needs 'size' [h, w] and 'counts'"
        if [int(size[0]), int(size[1])] != [height, width]:
            return Reason.INVALID_SEGMENTATION, f"RLE size {size} != image size [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_as_int(c) is not None and c >= 0 for c in counts):
                return (
                    Reason.INVALID_SEGMENTATION,
                    "uncompressed RLE counts must be non-negative ints",
                )
            if sum(counts) != height * width:
                return Reason.INVALID_SEGMENTATION, (
                    f"uncompressed RLE covers {sum(counts)} pixels, image has {height * width}"
                )
        elif not isinstance(counts, (str, bytes)):
            return Reason.INVALID_SEGMENTATION, "RLE counts must be a list or a string"
        return None
    return (
        Reason.INVALID_SEGMENTATION,
        f"unsupported segmentation type {type(segmentation).__name__}",
    )


# Boxes may stick out of the image by this many pixels (COCO's float rounding) before they are
# called out-of-image.
BOX_TOLERANCE_PX = 1.0


def _check_box(bbox: Any, height: int, width: int) -> tuple[Reason, str] | None:
    if not (isinstance(bbox, list) and len(bbox) == 4) or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in bbox
    ):
        return Reason.INVALID_ANNOTATION_RECORD, "bbox must be 4 finite numbers [x, y, w, h]"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return Reason.ZERO_AREA_BOX, f"bbox {bbox} has zero or negative size"
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return Reason.BOX_OUTSIDE_IMAGE, f"bbox {bbox} is outside the {width}x{height} image"
    return None


def index_coco(
    data: dict[str, Any], split: str, category_map: CategoryMap
) -> Iterator[ImageTask | Rejection]:
    """Checks every image and annotation record of one COCO file.

    Yields one `ImageTask` per image that passed the record checks (with its valid annotations
    attached) and one `Rejection` per image or annotation that failed them. An annotation whose
    image is rejected here is reported too, with reason `image_rejected`. Annotation records
    may be packed (`read_coco_json(packed=True)`); they then stay packed until their image's
    task is yielded.
    """
    images: dict[int, dict[str, Any]] = {}
    for record in data["images"]:
        if not isinstance(record, dict):
            yield Rejection("image", split, Reason.INVALID_IMAGE_RECORD, "not a JSON object")
            continue
        image_id = _as_int(record.get("id"))
        height, width = _as_int(record.get("height")), _as_int(record.get("width"))
        file_name = record.get("file_name")
        if image_id is None or height is None or width is None or not isinstance(file_name, str):
            yield Rejection(
                "image",
                split,
                Reason.INVALID_IMAGE_RECORD,
                "needs integer 'id', 'height', 'width' and a string 'file_name'",
                image_id=image_id,
                file_name=file_name if isinstance(file_name, str) else None,
            )
            continue
        if height <= 0 or width <= 0:
            yield Rejection(
                "image",
                split,
                Reason.INVALID_IMAGE_RECORD,
                f"non-positive size {width}x{height}",
                image_id=image_id,
                file_name=file_name,
            )
            continue
        if image_id in images:
            yield Rejection(
                "image",
                split,
                Reason.DUPLICATE_IMAGE_ID,
                f"id already used by {images[image_id]['file_name']!r}",
                image_id=image_id,
                file_name=file_name,
            )
            continue
        images[image_id] = record

    index_by_coco_id = category_map.index_by_coco_id
    annotations_by_image: dict[int, list[Any]] = {i: [] for i in images}
    seen_annotation_ids: set[int] = set()
    for position, record in enumerate(data["annotations"]):
        ann = unpack_annotation(record)
        if not isinstance(ann, dict):
            yield Rejection(
                "annotation",
                split,
                Reason.INVALID_ANNOTATION_RECORD,
                f"annotation #{position} is not a JSON object",
            )
            continue
        ann_id, image_id = _as_int(ann.get("id")), _as_int(ann.get("image_id"))
        category_id = _as_int(ann.get("category_id"))

        def reject(reason: Reason, detail: str, ann_id=ann_id, image_id=image_id) -> Rejection:
            return Rejection(
                "annotation", split, reason, detail, image_id=image_id, annotation_id=ann_id
            )

        if ann_id is None or image_id is None or category_id is None:
            yield reject(
                Reason.INVALID_ANNOTATION_RECORD,
                f"annotation #{position} needs integer 'id', 'image_id' and 'category_id'",
            )
            continue
        if ann_id in seen_annotation_ids:
            yield reject(Reason.DUPLICATE_ANNOTATION_ID, f"annotation id {ann_id} appears twice")
            continue
        seen_annotation_ids.add(ann_id)
        image = images.get(image_id)
        if image is None:
            yield reject(
                Reason.UNKNOWN_IMAGE, f"image id {image_id} is not a valid image of this file"
            )
            continue
        if category_id not in index_by_coco_id:
            yield reject(Reason.UNKNOWN_CATEGORY, f"category id {category_id} is not declared")
            continue
        height, width = image["height"], image["width"]
        problem = _check_box(ann.get("bbox"), height, width) or _check_segmentation(
            ann.get("segmentation"), height, width
        )
        if problem:
            yield reject(*problem)
            continue
        iscrowd = _as_int(ann.get("iscrowd", 0))
        area = ann.get("area")
        if iscrowd not in (0, 1) or not isinstance(area, (int, float)) or not math.isfinite(area):
            yield reject(
                Reason.INVALID_ANNOTATION_RECORD, "needs 'iscrowd' 0/1 and a finite 'area'"
            )
            continue
        annotations_by_image[image_id].append(record)

    for image_id, record in images.items():
        yield ImageTask(
            split=split,
            image_id=image_id,
            file_name=record["file_name"],
            height=record["height"],
            width=record["width"],
            annotations=[unpack_annotation(r) for r in annotations_by_image.pop(image_id)],
        )


def resolve_image_path(image_root: str, file_name: str) -> str | None:
    """Joins `file_name` to `image_root`, or returns None when it would escape the root.

    Refused: absolute paths, any `..` component, and (on local file systems) symlinks that
    resolve outside the root.
    """
    if not file_name or os.path.isabs(file_name) or file_name.startswith(("/", "\\")):
        return None
    parts = file_name.replace("\\", "/").split("/")
    if any(part in ("..", "") for part in parts) or "://" in file_name:
        return None
    path = os.path.join(image_root, *parts)
    if "://" in image_root:  # Object storage has no symlinks.
        return path
    root_real = os.path.realpath(image_root)
    path_real = os.path.realpath(path)
    if os.path.commonpath([root_real, path_real]) != root_real:
        return None
    return path
