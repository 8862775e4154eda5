"""A small, deterministic synthetic instance-segmentation dataset in real COCO format.

`generate_demo_dataset(out_dir)` writes

    out_dir/train/000001.jpg ...                 RGB JPEGs, about 224..352 px a side
    out_dir/val/000001.jpg ...
    out_dir/annotations/instances_train.json     COCO instances files; `file_name` is relative
    out_dir/annotations/instances_val.json       to `out_dir` (e.g. "train/000001.jpg")

Each image shows 2..8 annotated shapes (ellipse, rectangle, triangle, star, bar; COCO-style
non-contiguous category ids) on a textured background, overlapping and occluding one another.
Every image is generated from its own generator seeded with `(seed, split, index)`, so the same
seed gives byte-identical JSON and JPEG files.

How masks, pixels and annotations are kept in exact agreement:

1. Every shape is a polygon (an ellipse is a 16..64-gon) and is rasterised with pycocotools,
   the same rasteriser `COCO.annToMask` uses, into a label map, later shapes on top.
2. The pixels of each instance are painted from that label map, so what is visible in the image
   is exactly `label_map == label`.
3. An instance that is fully visible and inside the image keeps its shape polygon. Otherwise
   its visible mask is traced along pixel edges into one polygon per 4-connected part (several
   parts give a multi-part polygon). A part with holes (a shape painted on top of its middle)
   is kept as one polygon by joining each hole to the outer boundary with a vertical slit:
   pycocotools fills polygons column by column with the even-odd rule, and vertical segments
   add no crossings, so the slit is invisible and the hole stays empty.
4. Crowd regions (a cluster of tiny same-category shapes) are uncompressed column-major RLE,
   `{"counts": [...], "size": [h, w]}`, as in COCO.

Every annotation is decoded again at generation time and compared with its visible mask; any
disagreement is a bug and raises. `area` is the mask area (`pycocotools.mask.area`) and `bbox`
the tight `[x, y, width, height]` box of the mask.

Object sizes are drawn per SOLOv2 scale range: at the training resolution (shorter side 256,
longer side at most 352) sqrt(box_w * box_h) falls in one of <16, 16..32, 32..64, 64..128 and
>=150 px. Image `i` of a split always holds one object of range `i % 5`, image `i % 3 == 0` a
shape cut in two by a bar, and image `i % 4 == 0` a crowd region. The other shapes are drawn
from the three larger ranges (32 px and up), so that the set's own ceiling through SOLO's
1/4-scale masks stays well above the demo's AP goal (see `_EXTRA_SIZE_BUCKETS`).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = (
    {"id": 3, "name": "ellipse", "supercategory": "shape"},
    {"id": 7, "name": "rectangle", "supercategory": "shape"},
    {"id": 12, "name": "triangle", "supercategory": "shape"},
    {"id": 18, "name": "star", "supercategory": "shape"},
    {"id": 25, "name": "bar", "supercategory": "shape"},
)
_ELLIPSE, _RECTANGLE, _TRIANGLE, _STAR, _BAR = (c["id"] for c in CATEGORIES)
_BLOB_CATEGORIES = (_ELLIPSE, _RECTANGLE, _TRIANGLE, _STAR)

SPLITS = ("train", "val")
# The `make run` demo set. 768 training images: at the demo recipe's budget (2880 steps of 4
# images) a smaller set is memorised. With 192 images (58 epochs) the model reached mask AP
# 0.71 on its own training images and 0.34 on val; in the same steps, 384 images gave val AP
# 0.477 / 0.456 and 768 gave 0.471 / 0.519 (seeds 0 / 1), 1536 0.424 (seed 0, underfit;
# session 13, docs/experiments.md). Val images are seeded per image, so they do not depend on the train
# count. 64 val images rather than 16: one recipe's AP spread 0.089-0.105 from run to run on
# 16 images; evaluating 64 costs about 15 s more.
# Bumped whenever the same seed and counts would give other files: 2.0 draws the extra shapes
# from 32 px and up and cuts shapes with thicker bars (1.0: all five size buckets, 4..9 px bars).
GENERATOR_VERSION = "2.0"
DEFAULT_NUM_TRAIN = 768
DEFAULT_NUM_VAL = 64

# Training resolution the scale ranges refer to (the demo config's resize).
TRAIN_SHORT_SIDE = 256
TRAIN_MAX_LONG_SIDE = 352

# Object scale sqrt(box_w * box_h) at the training resolution: the range each target bucket is
# sampled from, and the bucket edges it must stay inside. The sampling ranges stay inside the
# buckets even when the image is resized to short side 256 without the long-side cap
# (at most 1.143x larger here), so the coverage holds under both readings of "resize to 256".
_SIZE_SAMPLING = ((8.0, 13.0), (18.0, 27.0), (36.0, 55.0), (70.0, 110.0), (150.0, 200.0))
_BUCKET_EDGES = ((0.0, 16.0), (16.0, 32.0), (32.0, 64.0), (64.0, 128.0), (150.0, math.inf))
NUM_SIZE_BUCKETS = len(_SIZE_SAMPLING)
# Buckets the optional extra shapes are drawn from. Each image's guaranteed object cycles
# through all five buckets (so every scale range is covered); the extras are 32 px and up.
# Drawing extras from all five made 41% of the instances smaller than 32 px (now 9%), which a
# 1/4-scale mask cannot outline: the oracle mask AP of that set (`benchmarks/mask_ceiling.py`)
# was 0.56, leaving no room for recognition errors under the demo's 0.5 goal; now it is 0.77.
_EXTRA_SIZE_BUCKETS = (2, 3, 4)
# Thickness at the training resolution of the bar cut across a shape (a two-part instance).
# At least 8 px keeps the bar 2 px wide in the 1/4-scale mask (4..9 px: oracle bar AP 0.34).
_SPLIT_BAR_THICKNESS = (8.0, 14.0)

_MIN_VISIBLE_FRACTION = 0.45  # of an instance's own area left visible after occlusion
_MIN_PART_PIXELS = 10  # smallest 4-connected visible part of an instance
_MAX_PARTS = 3
_JPEG_QUALITY = 90


# --------------------------------------------------------------------------------------------
# Public API


def generate_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = 0,
    scale: int = 1,
) -> dict:
    """Writes the synthetic COCO dataset under `out_dir` and returns a summary.

    Args:
      out_dir: root folder; created if needed. Existing files of the same names are replaced,
        other files are left alone.
      num_train: training images before `scale`.
      num_val: validation images before `scale`.
      seed: non-negative seed; the same seed writes identical files.
      scale: multiplies both image counts.

    Returns:
      `{"root", "categories", "splits": {split: {"annotation_file", "image_dir", "num_images",
      "num_annotations", "num_crowd", "num_multipart"}}}`, paths as strings.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train=} {num_val=}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    root = os.fspath(out_dir)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    summary: dict = {"root": root, "categories": [dict(c) for c in CATEGORIES], "splits": {}}
    for split, count in zip(SPLITS, (num_train * scale, num_val * scale)):
        summary["splits"][split] = _write_split(root, split, count, seed)
    return summary


# --------------------------------------------------------------------------------------------
# Splits and annotation encoding


def _write_split(root: str, split: str, num_images: int, seed: int) -> dict:
    """Renders, encodes and writes one split; returns its summary."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rendered = _render_image(_image_rng(seed, split, index), index)
        image_id = index + 1
        file_name = f"{split}/{image_id:06d}.jpg"
        height, width = rendered.label_map.shape
        Image.fromarray(rendered.rgb, mode="RGB").save(
            os.path.join(root, file_name), format="JPEG", quality=_JPEG_QUALITY
        )
        images.append(
            {"id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1}
        )
        for instance in rendered.instances:
            fields = _encode_instance(instance, rendered.label_map)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": instance.category_id,
                }
                | fields
            )

    coco = {
        "info": dataset_info(split, seed),
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    annotation_file = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(annotation_file, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    return {
        "annotation_file": annotation_file,
        "image_dir": os.path.join(root, split),
        "num_images": len(images),
        "num_annotations": len(annotations),
        "num_crowd": sum(a["iscrowd"] for a in annotations),
        "num_multipart": sum(
            1
            for a in annotations
            if isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1
        ),
    }


def dataset_info(split: str, seed: int) -> dict:
    """The COCO `info` record of a split: names the generator version and the seed, so that
    `solov2 demo-data --if-missing` can tell whether an existing set is the one it would write."""
    return {
        "description": f"SOLOv2 synthetic shapes demo dataset ({split}, seed {seed})",
        "version": GENERATOR_VERSION,
        "year": 2024,
        "contributor": "solov2 demo-data",
        "date_created": "2024-01-01",
        "url": "",
    }


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator image `index` of `split` is drawn from (independent of the split size)."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _encode_instance(instance: _Instance, label_map: np.ndarray) -> dict:
    """COCO `segmentation`, `area`, `bbox`, `iscrowd` for the visible region of `instance`.

    Raises RuntimeError if the encoded segmentation does not decode to exactly the visible mask.
    """
    height, width = label_map.shape
    visible = label_map == instance.label
    if instance.iscrowd:
        segmentation: dict | list = _uncompressed_rle(visible)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        fully_visible = np.count_nonzero(visible) == instance.full_area
        if fully_visible and _inside(instance.polygons[0], height, width):
            segmentation = [instance.polygons[0].ravel().tolist()]
        else:
            segmentation = _mask_to_polygons(visible)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not np.array_equal(mask_utils.decode(rle).astype(bool), visible):
        raise RuntimeError(f"segmentation of instance {instance.label} disagrees with its mask")
    return {
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(instance.iscrowd),
    }


def _inside(polygon: np.ndarray, height: int, width: int) -> bool:
    return bool(
        polygon[:, 0].min() >= 0
        and polygon[:, 1].min() >= 0
        and polygon[:, 0].max() <= width
        and polygon[:, 1].max() <= height
    )


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO crowd RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


# --------------------------------------------------------------------------------------------
# Mask -> polygons (exact under pycocotools' rasteriser)


def _mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """One flat `[x0, y0, x1, y1, ...]` polygon per 4-connected part of a boolean mask.

    Vertices lie on pixel corners (pixel (r, c) spans x in [c, c+1], y in [r, r+1]); holes are
    joined to the outer boundary by vertical slits (see the module docstring), so
    `pycocotools` decodes the list back to exactly `mask`.
    """
    labels, num_parts = _label_parts(mask)
    polygons = []
    for part in range(1, num_parts + 1):
        rows, cols = np.nonzero(labels == part)
        top, left = rows.min(), cols.min()
        crop = labels[top : rows.max() + 1, left : cols.max() + 1] == part
        path = _join_loops(_trace_loops(crop))
        path = _drop_straight_vertices(path) + np.array([left, top])
        polygons.append(path.astype(np.float64).ravel().tolist())
    return polygons


def _label_parts(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels `[H, W]` int32 (0 = background) and the number of parts.

    Union-find over horizontal runs: runs in adjacent rows that share a column are joined.
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(steps == 1)
    _, run_ends = np.nonzero(steps == -1)  # Same row-major order as the starts.
    parent = list(range(len(run_rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(run_rows, np.arange(height + 1))
    for row in range(1, height):
        i, i_end = row_first[row - 1], row_first[row]
        j, j_end = row_first[row], row_first[row + 1]
        while i < i_end and j < j_end:
            if run_starts[i] < run_ends[j] and run_starts[j] < run_ends[i]:
                root_i, root_j = find(i), find(j)
                if root_i != root_j:
                    parent[max(root_i, root_j)] = min(root_i, root_j)
            if run_ends[i] < run_ends[j]:
                i += 1
            else:
                j += 1

    labels = np.zeros((height, width), np.int32)
    part_of_root: dict[int, int] = {}
    for run in range(len(run_rows)):
        part = part_of_root.setdefault(find(run), len(part_of_root) + 1)
        labels[run_rows[run], run_starts[run] : run_ends[run]] = part
    return labels, len(part_of_root)


def _trace_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops `[N, 2]` int (x, y) of a mask along pixel edges, unit steps.

    Edges are directed with the mask on one fixed side. Where two pixels touch only at a corner
    the loop turns around the pixel it came along, which keeps diagonal neighbours apart.
    """
    padded = np.pad(mask, 1)
    core = padded[1:-1, 1:-1]
    # (neighbour is background) -> edge from (x0, y0) to (x1, y1) as offsets from pixel (c, r).
    sides = (
        (~padded[1:-1, :-2], (0, 0), (0, 1)),  # left side, going down
        (~padded[2:, 1:-1], (0, 1), (1, 1)),  # bottom side, going right
        (~padded[1:-1, 2:], (1, 1), (1, 0)),  # right side, going up
        (~padded[:-2, 1:-1], (1, 0), (0, 0)),  # top side, going left
    )
    starts, ends, owners = [], [], []
    for open_side, (sx, sy), (ex, ey) in sides:
        rows, cols = np.nonzero(core & open_side)
        starts.append(np.stack([cols + sx, rows + sy], axis=1))
        ends.append(np.stack([cols + ex, rows + ey], axis=1))
        owners.append(rows * mask.shape[1] + cols)
    start, end, owner = (np.concatenate(a) for a in (starts, ends, owners))
    stride = mask.shape[1] + 2
    start_key = (start[:, 1] * stride + start[:, 0]).tolist()
    end_key = (end[:, 1] * stride + end[:, 0]).tolist()
    owner = owner.tolist()

    leaving: dict[int, list[int]] = {}
    for edge, key in enumerate(start_key):
        leaving.setdefault(key, []).append(edge)
    used = [False] * len(start_key)
    loops = []
    for first in range(len(start_key)):
        if used[first]:
            continue
        loop, edge = [], first
        while not used[edge]:
            used[edge] = True
            loop.append(edge)
            candidates = [e for e in leaving[end_key[edge]] if not used[e]]
            if not candidates:
                break
            same_pixel = [e for e in candidates if owner[e] == owner[edge]]
            edge = same_pixel[0] if same_pixel else candidates[0]
        loops.append(start[loop])
    return loops


def _join_loops(loops: list[np.ndarray]) -> np.ndarray:
    """Splices every other loop into the largest one with vertical slits; returns `[N, 2]`."""
    areas = [abs(_signed_area(loop)) for loop in loops]
    order = np.argsort(areas)[::-1]
    outer = loops[order[0]]
    inserts: dict[int, list[np.ndarray]] = {}
    for index in order[1:]:
        hole = loops[index]
        top = int(np.lexsort((hole[:, 0], hole[:, 1]))[0])
        x0, y0 = hole[top]
        above = np.flatnonzero((outer[:, 0] == x0) & (outer[:, 1] < y0))
        if above.size == 0:  # Not inside the outer loop: cannot happen for one 4-connected part.
            raise RuntimeError("boundary loop outside its part")
        anchor = int(above[np.argmax(outer[above, 1])])
        hole = np.roll(hole, -top, axis=0)
        inserts.setdefault(anchor, []).append(
            np.concatenate([hole, hole[:1], outer[anchor : anchor + 1]])
        )
    pieces = []
    for i in range(len(outer)):
        pieces.append(outer[i : i + 1])
        pieces.extend(inserts.get(i, []))
    return np.concatenate(pieces)


def _signed_area(loop: np.ndarray) -> float:
    x, y = loop[:, 0].astype(np.int64), loop[:, 1].astype(np.int64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _drop_straight_vertices(path: np.ndarray) -> np.ndarray:
    """Removes repeated vertices and vertices in the middle of a straight run."""
    keep = np.any(path != np.roll(path, 1, axis=0), axis=1)
    path = path[keep] if keep.any() else path[:1]
    incoming = path - np.roll(path, 1, axis=0)
    outgoing = np.roll(path, -1, axis=0) - path
    cross = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    dot = (incoming * outgoing).sum(axis=1)
    return path[~((cross == 0) & (dot > 0))]


# --------------------------------------------------------------------------------------------
# Shapes


def _shape_polygon(
    rng: np.random.Generator, category_id: int, center: tuple[float, float], size: float
) -> tuple[np.ndarray, float]:
    """A shape polygon `[N, 2]` (x, y) whose box has sqrt(w * h) == `size`, and its angle."""
    angle = rng.uniform(0, 2 * math.pi)
    if category_id == _ELLIPSE:
        sides = int(np.clip(size / 2, 16, 64))
        t = np.linspace(0, 2 * math.pi, sides, endpoint=False)
        points = np.stack([np.cos(t), rng.uniform(0.55, 1.0) * np.sin(t)], axis=1)
    elif category_id in (_RECTANGLE, _BAR):
        aspect = rng.uniform(0.5, 1.0) if category_id == _RECTANGLE else 1 / rng.uniform(5, 9)
        points = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], float)
    elif category_id == _TRIANGLE:
        t = np.deg2rad([90, 210, 330] + rng.uniform(-12, 12, 3))
        radius = rng.uniform(0.8, 1.0, 3)
        points = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    elif category_id == _STAR:
        t = np.linspace(0, 2 * math.pi, 10, endpoint=False)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.42, 0.55))
        points = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    else:
        raise ValueError(f"unknown category id {category_id}")
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = points @ rotation.T
    extent = points.max(axis=0) - points.min(axis=0)
    points *= size / math.sqrt(extent[0] * extent[1])
    points += np.asarray(center) - (points.max(axis=0) + points.min(axis=0)) / 2
    return np.round(points, 2), angle


def _rasterize(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Union of polygons as a boolean `[H, W]` mask, with pycocotools' rasteriser."""
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


# --------------------------------------------------------------------------------------------
# Layout: placing shapes so that every instance stays recognisable


@dataclass
class _Instance:
    """One annotation: its label in the label map and the shape(s) painted for it."""

    label: int
    category_id: int
    polygons: list[np.ndarray]
    full_mask: np.ndarray  # [H, W] bool, before occlusion
    iscrowd: bool = False
    size_bucket: int | None = None  # Guaranteed scale bucket, checked on the visible box.
    must_stay_split: bool = False  # Cut in two by a bar; must stay multi-part.
    full_area: int = field(init=False)

    def __post_init__(self) -> None:
        self.full_area = int(np.count_nonzero(self.full_mask))


@dataclass
class _RenderedImage:
    """`rgb` `[H, W, 3]` uint8, `label_map` `[H, W]` int32 (0 = background, k = instances[k-1])."""

    rgb: np.ndarray
    label_map: np.ndarray
    instances: list[_Instance]


def _resize_factors(height: int, width: int) -> tuple[float, float]:
    """Training resize factor (short side 256, long side <= 352) and the uncapped one."""
    capped = min(TRAIN_SHORT_SIDE / min(height, width), TRAIN_MAX_LONG_SIDE / max(height, width))
    return capped, TRAIN_SHORT_SIDE / min(height, width)


def _bucket_of(scale: float) -> int | None:
    for bucket, (low, high) in enumerate(_BUCKET_EDGES):
        if low <= scale < high:
            return bucket
    return None


class _Layout:
    """Shapes painted in order into a label map; a shape that hides too much is taken back."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.factors = _resize_factors(height, width)
        self.label_map = np.zeros((height, width), np.int32)
        self.instances: list[_Instance] = []

    def try_add(self, instance: _Instance) -> bool:
        """Paints `instance` on top; keeps it only if every instance is still acceptable."""
        if instance.full_area == 0:
            return False
        previous = self.label_map.copy()
        self.label_map[instance.full_mask] = instance.label
        self.instances.append(instance)
        if all(self._acceptable(other, instance) for other in self.instances):
            return True
        self.label_map = previous
        self.instances.pop()
        return False

    def pop(self) -> None:
        """Takes back the last instance and repaints what it covered."""
        self.instances.pop()
        self.label_map[:] = 0
        for instance in self.instances:
            self.label_map[instance.full_mask] = instance.label

    def _acceptable(self, instance: _Instance, newest: _Instance) -> bool:
        if instance is not newest and not (instance.full_mask & newest.full_mask).any():
            return True
        visible = self.label_map == instance.label
        area = int(np.count_nonzero(visible))
        if area < _MIN_VISIBLE_FRACTION * instance.full_area or area < _MIN_PART_PIXELS:
            return False
        if instance.iscrowd:
            return True
        labels, num_parts = _label_parts(visible)
        if num_parts > _MAX_PARTS or np.bincount(labels.ravel())[1:].min() < _MIN_PART_PIXELS:
            return False
        if instance.must_stay_split and num_parts < 2:
            return False
        if instance.size_bucket is not None:
            rows, cols = np.nonzero(visible)
            box = math.sqrt((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
            if any(_bucket_of(box * f) != instance.size_bucket for f in self.factors):
                return False
        return True


def _random_shape(
    rng: np.random.Generator,
    layout: _Layout,
    label: int,
    bucket: int,
    *,
    category_id: int | None = None,
    allow_truncation: bool = False,
) -> _Instance | None:
    """A shape of a scale bucket at a random position, or None if it cannot fit the image."""
    height, width = layout.height, layout.width
    if category_id is None:
        category_id = int(
            rng.choice([*_BLOB_CATEGORIES, _BAR] if bucket <= 3 else _BLOB_CATEGORIES)
        )
    size = rng.uniform(*_SIZE_SAMPLING[bucket]) / layout.factors[0]
    polygon, _ = _shape_polygon(rng, category_id, (0.0, 0.0), size)
    extent = polygon.max(axis=0) - polygon.min(axis=0)
    margin = 0.3 if allow_truncation else 0.5
    low, high = extent * margin + 1, np.array([width, height]) - extent * margin - 1
    if np.any(low > high):
        return None
    polygon = np.round(polygon + rng.uniform(low, high), 2)
    return _Instance(label, category_id, [polygon], _rasterize([polygon], height, width))


def _place_guaranteed_bucket(rng: np.random.Generator, layout: _Layout, bucket: int) -> bool:
    for _ in range(20):
        instance = _random_shape(rng, layout, len(layout.instances) + 1, bucket)
        if instance is None:
            continue
        instance.size_bucket = bucket
        if layout.try_add(instance):
            return True
    return False


def _place_split_pair(rng: np.random.Generator, layout: _Layout) -> bool:
    """A medium/large shape with a thin bar painted across its middle (a two-part instance)."""
    height, width = layout.height, layout.width
    for _ in range(20):
        category_id = int(rng.choice(_BLOB_CATEGORIES))
        size = rng.uniform(60, 130) / layout.factors[0]
        polygon, angle = _shape_polygon(rng, category_id, (0.0, 0.0), size)
        extent = polygon.max(axis=0) - polygon.min(axis=0)
        low, high = extent / 2 + 1, np.array([width, height]) - extent / 2 - 1
        if np.any(low > high):
            continue
        center = rng.uniform(low, high)
        polygon = np.round(polygon + center, 2)
        target = _Instance(
            len(layout.instances) + 1, category_id, [polygon], _rasterize([polygon], height, width)
        )
        if not layout.try_add(target):
            continue
        for _ in range(10):
            bar = _bar_across(rng, layout, center, float(np.hypot(*extent)), angle + math.pi / 2)
            if layout.try_add(bar):
                target.must_stay_split = True
                return True
        layout.pop()
    return False


def _bar_across(
    rng: np.random.Generator, layout: _Layout, center: np.ndarray, span: float, angle: float
) -> _Instance:
    """A thin bar through `center`, about `span` long, roughly at `angle`."""
    angle += rng.uniform(-0.35, 0.35)
    length = span * rng.uniform(0.9, 1.3) / 2
    thickness = rng.uniform(*_SPLIT_BAR_THICKNESS) / layout.factors[0] / 2
    along = np.array([math.cos(angle), math.sin(angle)])
    across = np.array([-along[1], along[0]])
    offset = across * rng.uniform(-0.1, 0.1) * span
    corners = [
        s * length * along + t * thickness * across for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]
    polygon = np.round(np.array(corners) + center + offset, 2)
    return _Instance(
        len(layout.instances) + 1,
        _BAR,
        [polygon],
        _rasterize([polygon], layout.height, layout.width),
    )


def _place_crowd(rng: np.random.Generator, layout: _Layout) -> bool:
    """A cluster of 6..14 tiny shapes of one category, annotated as one crowd region."""
    height, width = layout.height, layout.width
    for _ in range(20):
        category_id = int(rng.choice(_BLOB_CATEGORIES))
        spread = rng.uniform(10, 24)
        center = rng.uniform([spread + 8, spread + 8], [width - spread - 8, height - spread - 8])
        polygons = []
        for _ in range(rng.integers(6, 15)):
            offset = np.clip(rng.normal(0, spread / 2, 2), -spread, spread)
            polygon, _ = _shape_polygon(rng, category_id, tuple(center + offset), rng.uniform(5, 9))
            polygons.append(polygon)
        crowd = _Instance(
            len(layout.instances) + 1,
            category_id,
            polygons,
            _rasterize(polygons, height, width),
            iscrowd=True,
        )
        if layout.try_add(crowd):
            return True
    return False


def _layout_image(rng: np.random.Generator, index: int, height: int, width: int) -> _Layout | None:
    """Places the guaranteed elements of image `index` and random extras, in random order."""
    layout = _Layout(height, width)
    groups = ["bucket"]
    if index % 3 == 0:
        groups.append("split")
    if index % 4 == 0:
        groups.append("crowd")
    num_instances = int(rng.integers(2, 9))
    guaranteed = len(groups) + groups.count("split")  # The split pair is two instances.
    groups += ["extra"] * max(0, num_instances - guaranteed)
    for group in [groups[i] for i in rng.permutation(len(groups))]:
        if group == "bucket":
            placed = _place_guaranteed_bucket(rng, layout, index % NUM_SIZE_BUCKETS)
        elif group == "split":
            placed = _place_split_pair(rng, layout)
        elif group == "crowd":
            placed = _place_crowd(rng, layout)
        else:
            for _ in range(15):
                bucket = int(rng.choice(_EXTRA_SIZE_BUCKETS))
                extra = _random_shape(
                    rng, layout, len(layout.instances) + 1, bucket, allow_truncation=True
                )
                if extra is not None and layout.try_add(extra):
                    break
            placed = True  # Extras are optional.
        if not placed:
            return None
    return layout if len(layout.instances) >= 2 else None


# --------------------------------------------------------------------------------------------
# Pixels


def _render_image(rng: np.random.Generator, index: int) -> _RenderedImage:
    """Draws one image: size, layout, background and instance textures.

    `index` (position in the split) selects the guaranteed contents described in the module
    docstring. The returned label map is the ground truth the annotations are encoded from.
    """
    height, width = int(rng.integers(224, 289)), int(rng.integers(256, 353))
    if rng.random() < 0.2:
        height, width = width, height
    for _ in range(30):
        layout = _layout_image(rng, index, height, width)
        if layout is not None:
            break
    else:
        raise RuntimeError(f"could not lay out image {index}")

    rgb = _background(rng, height, width)
    for instance in layout.instances:
        rows, cols = np.nonzero(layout.label_map == instance.label)
        if rows.size == 0:
            continue
        top, left = rows.min(), cols.min()
        texture = _texture(rng, rows.max() - top + 1, cols.max() - left + 1)
        rgb[rows, cols] = texture[rows - top, cols - left]
    rgb = np.clip(rgb + rng.normal(0, rng.uniform(3, 7), rgb.shape), 0, 255)
    return _RenderedImage(np.round(rgb).astype(np.uint8), layout.label_map, layout.instances)


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), np.float32)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.75))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted gradient + soft stripes + blurry blobs, `[H, W, 3]` float32 in [0, 255]."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(theta) + ys * math.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, stop = _muted_colour(rng), _muted_colour(rng)
    image = start + ramp[..., None] * (stop - start)

    phi = rng.uniform(0, math.pi)
    period = rng.uniform(10, 40)
    stripes = np.sin(2 * math.pi * (xs * math.cos(phi) + ys * math.sin(phi)) / period)
    image += rng.uniform(5, 14) * stripes[..., None] * rng.uniform(0.4, 1.0, 3).astype(np.float32)

    for _ in range(rng.integers(3, 8)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(8, 40)
        weight = rng.uniform(0.35, 0.7) * np.exp(
            -((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)
        )
        image += weight[..., None] * (_muted_colour(rng) - image)
    return image


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A saturated fill for one instance: flat, striped, gradient or checked, `[h, w, 3]`."""
    hue = rng.random()
    first = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))
    second = _hsv(hue + rng.uniform(-0.12, 0.12), rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        mix = np.zeros((height, width), np.float32)
    elif kind == 1:
        phi, period = rng.uniform(0, math.pi), rng.uniform(4, 14)
        mix = (np.sin(2 * math.pi * (xs * math.cos(phi) + ys * math.sin(phi)) / period) > 0) * 1.0
    elif kind == 2:
        phi = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(phi) + ys * math.sin(phi)
        mix = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    else:
        cell = rng.integers(3, 9)
        mix = ((ys // cell + xs // cell) % 2).astype(np.float32)
    fill = first + mix[..., None].astype(np.float32) * (second - first)
    return fill + rng.normal(0, rng.uniform(2, 6), (height, width, 1)).astype(np.float32)
