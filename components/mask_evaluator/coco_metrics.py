"""COCO mask AP and box-from-mask AP with pycocotools, behind a small evaluator protocol.

The evaluator knows nothing about the model or about tf.Example keys: the caller decodes ground
truth and predictions (see `schemas/features.py`) and feeds plain Python values, one image at a
time, like detectron2's `DatasetEvaluator` (reset / process / evaluate).

Conventions:
  * Masks are COCO RLE at the original image size `[height, width]`: `{"size": [h, w],
    "counts": bytes | str}` (compressed, as `pycocotools.mask.encode` writes it). Ground truth
    may also use uncompressed RLE (`counts` a list of ints, as COCO crowd regions are stored).
  * Category ids are the original COCO ids (non-contiguous), never contiguous class indices.
  * Ground-truth `area` is the value stored in the annotation JSON, as pycocotools expects: it
    decides the small / medium / large split of ground truth.
  * Box AP is "box AP from masks", as in the SOLO papers: the box of every detection AND of every
    ground-truth object is `pycocotools.mask.toBbox` of its mask, so a perfect mask gives a perfect
    box. (COCO's stored `bbox` comes from polygon vertices and differs from the rasterized mask's
    box by up to a pixel, so a detector that only predicts masks could never reach box AP 1.)
    Ground-truth area for box AP stays the stored mask area (COCO's convention); detection area
    is the box area, as `COCO.loadRes` sets it for box results.
  * Per-category AP is mask AP at IoU 0.50:0.95, area "all", 100 detections, i.e. the mean of
    `COCOeval.eval["precision"][:, :, k, 0, -1]` over entries > -1. A category without any
    ground truth has no defined AP and gets -1 (pycocotools' marker), never NaN.
  * The whole accumulated mask precision array is kept too (`PrecisionTable`), for
    precision/recall curves; -1 there also means "no ground truth for this category and area".

Degenerate cases give pycocotools' own numbers without crashing: no detections at all -> 0 for
every stat whose category/area cell has ground truth (-1 where none); no ground truth at all
-> -1 everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Names of `COCOeval.stats[0:12]`, in order.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


@dataclasses.dataclass(frozen=True)
class PrecisionTable:
    """COCOeval's accumulated precision (`eval["precision"]`) with the values of its axes.

    `precision[t, r, k, a, m]` is the interpolated precision at IoU threshold
    `iou_thresholds[t]`, recall threshold `recall_thresholds[r]`, category `category_ids[k]`,
    area range `area_ranges[a]` and at most `max_detections[m]` detections per image. It is -1
    where that category has no ground truth in that area range (a whole `[:, :, k, a, m]`
    column), and 0 at recalls the detections never reach.
    """

    precision: np.ndarray  # [T, R, K, A, M] float64: T=10 IoUs, R=101 recalls, A=4, M=3.
    iou_thresholds: np.ndarray  # [T] float64: 0.50, 0.55, ..., 0.95.
    recall_thresholds: np.ndarray  # [R] float64: 0.00, 0.01, ..., 1.00.
    category_ids: np.ndarray  # [K] int64: COCO category ids, in COCOeval's order.
    area_ranges: tuple[str, ...]  # [A]: "all", "small", "medium", "large".
    max_detections: np.ndarray  # [M] int64: 1, 10, 100.

    @classmethod
    def from_cocoeval(cls, coco_eval: COCOeval) -> PrecisionTable:
        params = coco_eval.params
        return cls(
            precision=np.asarray(coco_eval.eval["precision"], np.float64),
            iou_thresholds=np.asarray(params.iouThrs, np.float64),
            recall_thresholds=np.asarray(params.recThrs, np.float64),
            category_ids=np.asarray(params.catIds, np.int64).reshape(-1),
            area_ranges=tuple(params.areaRngLbl),
            max_detections=np.asarray(params.maxDets, np.int64),
        )

    def to_npz(self) -> bytes:
        """The table as the bytes of a compressed `.npz` file (one array per field)."""
        out = io.BytesIO()
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["area_ranges"] = np.asarray(self.area_ranges, dtype=str)
        np.savez_compressed(out, **fields)
        return out.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> PrecisionTable:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            fields = {f.name: npz[f.name] for f in dataclasses.fields(cls)}
        fields["area_ranges"] = tuple(str(a) for a in fields["area_ranges"])
        return cls(**fields)


class DatasetEvaluator(Protocol):
    """What the evaluator component needs from any evaluator; independent of the model."""

    def reset(self) -> None: ...

    def add_ground_truth(
        self, image_id: int, height: int, width: int, annotations: Sequence[Mapping[str, Any]]
    ) -> None: ...

    def add_detections(self, image_id: int, detections: Sequence[Mapping[str, Any]]) -> None: ...

    def evaluate(self) -> dict[str, Any]: ...


def _compressed_rle(rle: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
    """Returns `{"size": [h, w], "counts": str}`; accepts bytes, str or uncompressed counts."""
    size = [int(s) for s in rle["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):  # Uncompressed RLE, e.g. a COCO crowd region.
        counts = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": size, "counts": counts}


def _mask_to_rle(mask: np.ndarray, height: int | None, width: int | None) -> dict[str, Any]:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a detection mask must be [H, W], got shape {mask.shape}")
    if height is not None and mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} differs from the image size {(height, width)}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


class CocoMaskEvaluator:
    """Accumulates ground truth and detections per image, then runs COCOeval segm and bbox.

    Usage:
        evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "person"}, ...])
        for each image:
            evaluator.add_ground_truth(image_id, height, width, annotations)
            evaluator.add_detections(image_id, detections)
        result = evaluator.evaluate()
        result["segm"]["AP"], result["bbox"]["AP50"], result["per_category"][1]["AP"]

    Every image of the evaluation split must be registered through `add_ground_truth`, even with
    no annotations: COCOeval counts its false positives.
    """

    def __init__(
        self,
        categories: Iterable[Mapping[str, Any]] | None = None,
        verbose: bool = False,
    ) -> None:
        """
        Args:
          categories: every COCO category `{"id": int, "name": str}` of the dataset, including
            those without ground truth in this split. When None, the categories are the ids seen
            in ground truth and detections, without names. When given, an unknown category id in
            `add_ground_truth` or `add_detections` raises ValueError (a label-mapping bug).
          verbose: also print pycocotools' output; it is captured into `result["summary"]`
            either way.
        """
        if categories is None:
            self._categories: dict[int, str | None] | None = None
        else:
            self._categories = {int(c["id"]): c.get("name") for c in categories}
        self._verbose = verbose
        self.reset()

    def reset(self) -> None:
        """Forgets all ground truth and detections (categories are kept)."""
        self._images: dict[int, tuple[int, int]] = {}
        self._gt: list[dict[str, Any]] = []
        self._dt: dict[int, list[dict[str, Any]]] = {}
        self._seen_category_ids: set[int] = set()

    def _check_category(self, category_id: int) -> None:
        if self._categories is not None and category_id not in self._categories:
            raise ValueError(f"category id {category_id} is not in the category list")
        self._seen_category_ids.add(category_id)

    def add_ground_truth(
        self,
        image_id: int,
        height: int,
        width: int,
        annotations: Sequence[Mapping[str, Any]],
    ) -> None:
        """Registers one image and its ground-truth objects.

        Args:
          image_id: COCO image id (may exceed 2**31).
          height, width: original image size in pixels.
          annotations: dicts with `category_id` (COCO id), `rle` (`{"size": [h, w], "counts":
            bytes | str | list[int]}` at the original size), `area` (as stored in the JSON),
            `iscrowd` (0/1), and optionally `id` (a positive, unique annotation id; unique ids
            are synthesized after the largest given one when absent).
        """
        image_id, height, width = int(image_id), int(height), int(width)
        if image_id in self._images:
            raise ValueError(f"ground truth for image {image_id} was already added")
        self._images[image_id] = (height, width)
        for ann in annotations:
            category_id = int(ann["category_id"])
            self._check_category(category_id)
            ann_id = ann.get("id")
            self._gt.append(
                {
                    "id": None if ann_id is None else int(ann_id),
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": _compressed_rle(ann["rle"], height, width),
                    "area": float(ann["area"]),
                    "iscrowd": int(ann["iscrowd"]),
                }
            )

    def add_detections(self, image_id: int, detections: Sequence[Mapping[str, Any]]) -> None:
        """Adds predictions for one image (may be called more than once per image).

        Args:
          image_id: COCO image id, registered by `add_ground_truth` before or after this call.
          detections: dicts with `category_id` (COCO id), `score`, and either `rle` (compressed
            RLE at the original size) or `mask` (a binary array [H, W] at the original size).
        """
        image_id = int(image_id)
        height, width = self._images.get(image_id, (None, None))
        out = self._dt.setdefault(image_id, [])
        for det in detections:
            category_id = int(det["category_id"])
            self._check_category(category_id)
            if "rle" in det:
                rle = det["rle"]
                # The size is checked against the image at evaluate() if it is registered later.
                h, w = (height, width) if height is not None else [int(s) for s in rle["size"]]
                segmentation = _compressed_rle(rle, h, w)
            else:
                segmentation = _mask_to_rle(det["mask"], height, width)
            out.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "score": float(det["score"]),
                }
            )

    def detections(self) -> list[dict[str, Any]]:
        """All detections in COCO results format (JSON-ready: counts are str)."""
        return [dict(d, segmentation=dict(d["segmentation"])) for d in self._all_detections()]

    def _all_detections(self) -> list[dict[str, Any]]:
        return list(itertools.chain.from_iterable(self._dt.values()))

    def _category_list(self) -> list[dict[str, Any]]:
        if self._categories is not None:
            return [{"id": i, "name": n} for i, n in sorted(self._categories.items())]
        return [{"id": i, "name": str(i)} for i in sorted(self._seen_category_ids)]

    def _ground_truth_annotations(self) -> list[dict[str, Any]]:
        given = [a["id"] for a in self._gt if a["id"] is not None]
        if len(set(given)) != len(given):
            raise ValueError("ground-truth annotation ids are not unique")
        # COCOeval stores the matched GT id in `dtMatches` and reads 0 as "unmatched".
        if any(i <= 0 for i in given):
            raise ValueError("ground-truth annotation ids must be positive")
        next_id = itertools.count(max(given, default=0) + 1)
        return [dict(a, id=next(next_id) if a["id"] is None else a["id"]) for a in self._gt]

    def _check_detection_images(self, detections: list[dict[str, Any]]) -> None:
        unknown = sorted({d["image_id"] for d in detections} - self._images.keys())
        if unknown:
            raise ValueError(f"detections for images without ground truth registered: {unknown}")
        for d in detections:
            if d["segmentation"]["size"] != list(self._images[d["image_id"]]):
                raise ValueError(
                    f"detection mask size {d['segmentation']['size']} differs from image "
                    f"{d['image_id']} size {list(self._images[d['image_id']])}"
                )

    def evaluate(self) -> dict[str, Any]:
        """Runs COCOeval for masks and for boxes from masks.

        Returns:
          {
            "segm": {name: float for name in STAT_NAMES},   # mask AP / AR
            "bbox": {name: float for name in STAT_NAMES},   # box AP / AR, boxes from masks
            "per_category": {coco_id: {"name": str | None, "AP": float}},  # mask AP, -1 = no GT
            "precision": PrecisionTable,  # mask precision [T, R, K, A, M], for PR curves
            "detections": [COCO results dicts: image_id, category_id, segmentation, score],
            "summary": str,   # pycocotools' printed output for both runs
          }
        """
        detections = self.detections()
        self._check_detection_images(detections)
        gt_annotations = self._ground_truth_annotations()
        images = [{"id": i, "height": h, "width": w} for i, (h, w) in self._images.items()]
        categories = self._category_list()

        gt_boxes = [
            dict(a, bbox=[float(v) for v in mask_utils.toBbox(a["segmentation"])])
            for a in gt_annotations
        ]
        dt_boxes = [
            {
                "image_id": d["image_id"],
                "category_id": d["category_id"],
                "bbox": [float(v) for v in mask_utils.toBbox(d["segmentation"])],
                "score": d["score"],
            }
            for d in detections
        ]

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print("== segm ==")
            segm_eval = _run_cocoeval(images, categories, gt_annotations, detections, "segm")
            print("== bbox (boxes from masks) ==")
            bbox_eval = _run_cocoeval(images, categories, gt_boxes, dt_boxes, "bbox")
        summary = out.getvalue()
        if self._verbose:
            print(summary, end="")

        names = self._categories or {}
        precision = segm_eval.eval["precision"]  # [T, R, K, A, M]
        per_category = {}
        for k, category_id in enumerate(segm_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_category[int(category_id)] = {
                "name": names.get(category_id),
                "AP": float(np.mean(p)) if p.size else -1.0,
            }
        return {
            "segm": _named_stats(segm_eval),
            "bbox": _named_stats(bbox_eval),
            "per_category": per_category,
            "precision": PrecisionTable.from_cocoeval(segm_eval),
            "detections": detections,
            "summary": summary,
        }


def _named_stats(coco_eval: COCOeval) -> dict[str, float]:
    return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}


def _run_cocoeval(
    images: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    gt_annotations: list[dict[str, Any]],
    detections: list[dict[str, Any]],
    iou_type: str,
) -> COCOeval:
    """COCO(gt) -> loadRes(dt) -> COCOeval evaluate/accumulate/summarize, all in memory."""
    coco_gt = COCO()
    coco_gt.dataset = {
        "images": images,
        "categories": categories,
        "annotations": gt_annotations,
    }
    coco_gt.createIndex()
    if detections:
        # loadRes writes area / bbox / id / iscrowd into the dicts: give it copies.
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
    else:
        # loadRes indexes anns[0]; an empty result set is an empty COCO over the same images.
        coco_dt = COCO()
        coco_dt.dataset = {"images": list(images), "categories": categories, "annotations": []}
        coco_dt.createIndex()
    coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval
