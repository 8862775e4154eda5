"""Tests for components/mask_evaluator/coco_metrics.py.

The exactness test feeds real COCO val2014 ground truth and cocoapi's fake segm results through
the evaluator's own input path and checks the published COCOeval numbers to 1e-12. The published
bbox numbers are for a different results file (cocoapi's fake *box* detections) scored against
COCO's stored boxes; the evaluator measures box AP from masks, so that part is instead checked
against a plain pycocotools run on boxes taken from the same masks.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import pathlib

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.mask_evaluator.coco_metrics import STAT_NAMES, CocoMaskEvaluator

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
EVAL_DIR = DATA_DIR / "coco_val2014_100_eval"
needs_data = pytest.mark.skipif(
    not EVAL_DIR.is_dir(),
    reason=f"{EVAL_DIR} is absent (real COCO reference data exists only in the dev workspace)",
)


def _box_mask(height, width, y0, y1, x0, x1):
    """A binary [height, width] mask, ones on rows y0:y1 and columns x0:x1."""
    m = np.zeros((height, width), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _rle(mask):
    return mask_utils.encode(np.asfortranarray(mask))


def _gt(category_id, mask, iscrowd=0, ann_id=None):
    ann = {
        "category_id": category_id,
        "rle": _rle(mask),
        "area": float(mask.sum()),
        "iscrowd": iscrowd,
    }
    if ann_id is not None:
        ann["id"] = ann_id
    return ann


# --------------------------------------------------------------------------- real COCO data


def _json_segmentation_to_rle(segmentation, height, width):
    """What ingestion stores: polygons -> frPyObjects + merge; RLE -> compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


@pytest.fixture(scope="module")
def real_case():
    gt_json = json.loads((EVAL_DIR / "instances_val2014_100.json").read_text())
    segm_results = json.loads((EVAL_DIR / "instances_val2014_fakesegm100_results.json").read_text())
    expected = json.loads((EVAL_DIR / "expected_stats.json").read_text())

    anns_by_image = collections.defaultdict(list)
    for ann in gt_json["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    ground_truth = []  # (image_id, height, width, annotations) in our input format.
    for image in gt_json["images"]:
        h, w = image["height"], image["width"]
        annotations = [
            {
                "category_id": a["category_id"],
                "rle": _json_segmentation_to_rle(a["segmentation"], h, w),
                "area": a["area"],
                "iscrowd": a["iscrowd"],
                "id": a["id"],
            }
            for a in anns_by_image[image["id"]]
        ]
        ground_truth.append((image["id"], h, w, annotations))
    dets_by_image = collections.defaultdict(list)
    for r in segm_results:
        dets_by_image[r["image_id"]].append(
            {"category_id": r["category_id"], "score": r["score"], "rle": r["segmentation"]}
        )
    categories = [{"id": c["id"], "name": c["name"]} for c in gt_json["categories"]]
    return gt_json, segm_results, expected, ground_truth, dets_by_image, categories


@pytest.fixture(scope="module")
def real_result(real_case):
    _, _, _, ground_truth, dets_by_image, categories = real_case
    evaluator = CocoMaskEvaluator(categories=categories)
    for image_id, h, w, anns in ground_truth:
        evaluator.add_ground_truth(image_id, h, w, anns)
    for image_id, dets in dets_by_image.items():
        evaluator.add_detections(image_id, dets)
    return evaluator.evaluate()


@needs_data
def test_reproduces_published_segm_stats(real_case, real_result):
    expected = real_case[2]["results"]["segm"]["published_faster_coco_eval_test"]
    got = [real_result["segm"][name] for name in STAT_NAMES]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert len(real_result["detections"]) == len(real_case[1]) == 734


@needs_data
def test_box_ap_from_masks_equals_plain_pycocotools(real_case, real_result):
    gt_json, segm_results = real_case[0], real_case[1]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt_json))
        coco_gt.createIndex()
        for ann in coco_gt.dataset["annotations"]:
            ann["bbox"] = mask_utils.toBbox(coco_gt.annToRLE(ann)).tolist()
        coco_gt.createIndex()
        dets = [
            {
                "image_id": r["image_id"],
                "category_id": r["category_id"],
                "score": r["score"],
                "bbox": mask_utils.toBbox(r["segmentation"]).tolist(),
            }
            for r in segm_results
        ]
        reference = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    got = [real_result["bbox"][name] for name in STAT_NAMES]
    np.testing.assert_allclose(got, reference.stats, rtol=0, atol=1e-12)
    # Boxes from masks are not COCO's stored boxes: this is not the published fake-bbox number.
    assert real_result["bbox"]["AP"] != pytest.approx(
        real_case[2]["results"]["bbox"]["published_faster_coco_eval_test"][0], abs=1e-3
    )


@needs_data
def test_per_category_real(real_case, real_result):
    per_category = real_result["per_category"]
    categories = real_case[5]
    assert sorted(per_category) == sorted(c["id"] for c in categories)  # all 80, ids up to 90
    used = {a["category_id"] for a in real_case[0]["annotations"]}
    assert len(used) == 70
    for c in categories:
        assert per_category[c["id"]]["name"] == c["name"]
        if c["id"] not in used:
            assert per_category[c["id"]]["AP"] == -1.0
    # COCOeval's AP is the mean of per-category APs (every used category has a defined AP).
    aps = [v["AP"] for v in per_category.values() if v["AP"] > -1]
    assert len(aps) == 70
    assert np.mean(aps) == pytest.approx(real_result["segm"]["AP"], abs=1e-12)


@needs_data
def test_perfect_detections_on_real_gt(real_case):
    _, _, _, ground_truth, _, categories = real_case
    evaluator = CocoMaskEvaluator(categories=categories)
    for image_id, h, w, anns in ground_truth:
        evaluator.add_ground_truth(image_id, h, w, anns)
        evaluator.add_detections(
            image_id,
            [
                {"category_id": a["category_id"], "score": 1.0, "rle": a["rle"]}
                for a in anns
                if not a["iscrowd"]
            ],
        )
    result = evaluator.evaluate()
    assert result["segm"]["AP"] == 1.0
    assert result["segm"]["AR100"] == 1.0
    # Both boxes come from the same masks, so box AP is perfect too.
    assert result["bbox"]["AP"] == 1.0


# --------------------------------------------------------------------------- synthetic cases


def test_perfect_detections_give_ap_one():
    h, w = 40, 50
    masks = [_box_mask(h, w, 0, 10, 0, 10), _box_mask(h, w, 5, 35, 20, 48)]
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    evaluator.add_ground_truth(7, h, w, [_gt(1, masks[0]), _gt(2, masks[1])])
    evaluator.add_ground_truth(8, h, w, [_gt(1, masks[1]), _gt(2, masks[0])])
    evaluator.add_detections(7, [{"category_id": 1, "score": 1.0, "mask": masks[0]}])
    evaluator.add_detections(7, [{"category_id": 2, "score": 1.0, "mask": masks[1]}])
    evaluator.add_detections(8, [{"category_id": 1, "score": 1.0, "rle": _rle(masks[1])}])
    evaluator.add_detections(8, [{"category_id": 2, "score": 1.0, "rle": _rle(masks[0])}])
    result = evaluator.evaluate()
    for kind in ("segm", "bbox"):
        assert result[kind]["AP"] == 1.0
        assert result[kind]["AP50"] == 1.0
        assert result[kind]["AR100"] == 1.0
    assert result["per_category"] == {1: {"name": "a", "AP": 1.0}, 2: {"name": "b", "AP": 1.0}}


def test_perfect_single_instance_category_is_one_minus_ulp():
    """pycocotools' precision is tp / (tp + fp + np.spacing(1)): with a single true positive
    that is 1 / (1 + 2**-52) = 1 - 2**-52, not 1. From two instances on, the interpolated
    precision reaches exactly 1 (2 + 2**-52 rounds to 2)."""
    h, w = 20, 20
    m = _box_mask(h, w, 2, 12, 2, 12)
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}])
    evaluator.add_ground_truth(1, h, w, [_gt(1, m)])
    evaluator.add_detections(1, [{"category_id": 1, "score": 1.0, "mask": m}])
    result = evaluator.evaluate()
    assert result["per_category"][1]["AP"] == 1.0 / (1.0 + np.spacing(1)) == 1.0 - 2.0**-52
    assert result["segm"]["AR100"] == 1.0


def test_no_detections_gives_zero_where_gt_exists(capsys):
    h, w = 20, 20
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    evaluator.add_ground_truth(1, h, w, [_gt(1, _box_mask(h, w, 0, 10, 0, 10))])  # small
    evaluator.add_ground_truth(2, h, w, [])
    result = evaluator.evaluate()
    # Only "small" objects exist: COCOeval gives 0 where there is ground truth, -1 elsewhere.
    expected = {n: 0.0 for n in STAT_NAMES} | {"APm": -1.0, "APl": -1.0, "ARm": -1.0, "ARl": -1.0}
    assert result["segm"] == expected
    assert result["bbox"] == expected
    assert result["per_category"] == {1: {"name": "a", "AP": 0.0}, 2: {"name": "b", "AP": -1.0}}
    assert result["detections"] == []
    assert "Average Precision" in result["summary"]
    assert capsys.readouterr().out == ""  # pycocotools' printing is captured, not shown.


def test_no_ground_truth_gives_minus_one():
    h, w = 20, 20
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}])
    evaluator.add_ground_truth(1, h, w, [])
    evaluator.add_ground_truth(2, h, w, [])
    evaluator.add_detections(1, [{"category_id": 1, "score": 0.9, "mask": np.ones((h, w))}])
    minus_one = {n: -1.0 for n in STAT_NAMES}
    result = evaluator.evaluate()
    assert result["segm"] == minus_one
    assert result["bbox"] == minus_one
    assert result["per_category"] == {1: {"name": "a", "AP": -1.0}}
    # Neither ground truth nor detections.
    evaluator.reset()
    evaluator.add_ground_truth(1, h, w, [])
    result = evaluator.evaluate()
    assert result["segm"] == minus_one
    assert result["bbox"] == minus_one


def test_detection_on_crowd_region_is_not_a_false_positive():
    h, w = 60, 60
    people = [_box_mask(h, w, 0, 20, 0, 20), _box_mask(h, w, 0, 20, 30, 50)]
    crowd = _box_mask(h, w, 30, 60, 0, 60)
    inside_crowd = _box_mask(h, w, 35, 55, 10, 30)  # crowd IoU = intersection / detection = 1
    dets = [
        {"category_id": 1, "score": 0.9, "mask": inside_crowd},  # ranked above the true positives
        {"category_id": 1, "score": 0.5, "mask": people[0]},
        {"category_id": 1, "score": 0.4, "mask": people[1]},
    ]

    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "person"}])
    evaluator.add_ground_truth(
        1, h, w, [_gt(1, people[0]), _gt(1, crowd, iscrowd=1), _gt(1, people[1])]
    )
    evaluator.add_detections(1, dets)
    assert evaluator.evaluate()["segm"]["AP50"] == 1.0

    # Without the crowd region the same detection is a false positive ranked first:
    # precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> interpolated 2/3 at every recall threshold.
    evaluator.reset()
    evaluator.add_ground_truth(1, h, w, [_gt(1, people[0]), _gt(1, people[1])])
    evaluator.add_detections(1, dets)
    assert evaluator.evaluate()["segm"]["AP50"] == pytest.approx(2 / 3, abs=1e-12)


def test_per_category_ap_with_non_contiguous_ids():
    h, w = 30, 30
    a, b = _box_mask(h, w, 0, 10, 0, 10), _box_mask(h, w, 15, 30, 15, 30)
    categories = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 90, "name": "toy"}]
    evaluator = CocoMaskEvaluator(categories=categories)
    evaluator.add_ground_truth(1, h, w, [_gt(3, a), _gt(17, a), _gt(17, b)])
    evaluator.add_detections(
        1,
        [
            {"category_id": 3, "score": 0.8, "mask": a},
            {"category_id": 17, "score": 0.7, "mask": b},  # finds one of the two dogs
        ],
    )
    result = evaluator.evaluate()
    half = 51 / 101  # precision 1 at recall thresholds 0.00..0.50, 0 above
    per_category = result["per_category"]
    assert list(per_category) == [3, 17, 90]
    assert [v["name"] for v in per_category.values()] == ["cat", "dog", "toy"]
    # approx: a lone true positive has precision 1 - 2**-52 in pycocotools (see above).
    assert per_category[3]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert per_category[17]["AP"] == pytest.approx(half, abs=1e-12)
    assert per_category[90]["AP"] == -1.0  # no ground truth
    assert result["segm"]["AP"] == pytest.approx((1.0 + half) / 2, abs=1e-12)

    # Without a category list: categories are the ids seen, with no names.
    evaluator = CocoMaskEvaluator()
    evaluator.add_ground_truth(1, h, w, [_gt(17, a), _gt(3, b)])
    evaluator.add_detections(1, [{"category_id": 17, "score": 0.8, "mask": a}])
    per_category = evaluator.evaluate()["per_category"]
    assert list(per_category) == [3, 17]
    assert per_category[3] == {"name": None, "AP": 0.0}
    assert per_category[17]["name"] is None
    assert per_category[17]["AP"] == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_ap50_and_ap75():
    """Two images, one GT each, three detections with known IoUs.

    image 1: g1 = 10x10 square; d1 (score .9) covers 8 of its 10 columns   -> IoU 80/100 = 0.8
    image 2: g2 = 10x10 square; d2 (score .8) overlaps 3 columns          -> IoU 30/170
                                d3 (score .7) covers 6 of its 10 columns   -> IoU 60/100 = 0.6
    IoU .50, by score: d1 TP, d2 FP, d3 TP -> recall .5 .5 1, precision 1 .5 2/3.
      Interpolated (max precision at recall >= r): 1 for r <= .5, 2/3 for r > .5.
    IoU .75: d1 TP, d2 FP, d3 FP -> recall .5 .5 .5: 1 for r <= .5, 0 above.
    """
    h, w = 20, 20
    square = _box_mask(h, w, 0, 10, 0, 10)
    evaluator = CocoMaskEvaluator(categories=[{"id": 5, "name": "x"}])
    evaluator.add_ground_truth(1, h, w, [_gt(5, square)])
    evaluator.add_ground_truth(2, h, w, [_gt(5, square)])
    evaluator.add_detections(
        1, [{"category_id": 5, "score": 0.9, "mask": _box_mask(h, w, 0, 10, 0, 8)}]
    )
    evaluator.add_detections(
        2,
        [
            {"category_id": 5, "score": 0.8, "mask": _box_mask(h, w, 0, 10, 7, 17)},
            {"category_id": 5, "score": 0.7, "mask": _box_mask(h, w, 0, 10, 0, 6)},
        ],
    )
    result = evaluator.evaluate()

    recall_thresholds = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points
    ap50 = np.mean(np.where(recall_thresholds <= 0.5, 1.0, 2.0 / 3.0))
    ap75 = np.mean(np.where(recall_thresholds <= 0.5, 1.0, 0.0))
    assert result["segm"]["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert result["segm"]["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert result["segm"]["AP75"] == pytest.approx(ap75, abs=1e-12)
    # Axis-aligned rectangles: the boxes from masks have the same IoUs.
    assert result["bbox"]["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert result["bbox"]["AP75"] == pytest.approx(ap75, abs=1e-12)


def test_detections_are_coco_results_json():
    h, w = 12, 16
    m = _box_mask(h, w, 2, 9, 3, 11)
    evaluator = CocoMaskEvaluator(categories=[{"id": 44, "name": "bottle"}])
    evaluator.add_ground_truth(2**33, h, w, [_gt(44, m, ann_id=9)])
    evaluator.add_detections(
        np.int64(2**33), [{"category_id": np.int64(44), "score": np.float32(0.5), "mask": m}]
    )
    detections = evaluator.evaluate()["detections"]
    assert detections == [
        {
            "image_id": 2**33,
            "category_id": 44,
            "segmentation": {"size": [h, w], "counts": _rle(m)["counts"].decode("ascii")},
            "score": 0.5,
        }
    ]
    decoded = json.loads(json.dumps(detections))
    np.testing.assert_array_equal(mask_utils.decode(decoded[0]["segmentation"]), m)


def test_synthesized_annotation_ids_do_not_collide():
    h, w = 20, 20
    masks = [_box_mask(h, w, 0, 5, 0, 5), _box_mask(h, w, 10, 20, 10, 20)]
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}])
    # Given id 1 would collide with a naive 1, 2, ... numbering of the id-less annotation.
    evaluator.add_ground_truth(1, h, w, [_gt(1, masks[0]), _gt(1, masks[1], ann_id=1)])
    evaluator.add_detections(1, [{"category_id": 1, "score": 1.0, "mask": m} for m in masks])
    assert evaluator.evaluate()["segm"]["AP"] == 1.0


def test_invalid_inputs_raise():
    h, w = 10, 10
    m = _box_mask(h, w, 0, 5, 0, 5)
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}])
    evaluator.add_ground_truth(1, h, w, [_gt(1, m)])
    with pytest.raises(ValueError, match="already added"):
        evaluator.add_ground_truth(1, h, w, [])
    with pytest.raises(ValueError, match="not in the category list"):
        evaluator.add_detections(1, [{"category_id": 2, "score": 1.0, "mask": m}])
    with pytest.raises(ValueError, match="differs from the image size"):
        evaluator.add_detections(1, [{"category_id": 1, "score": 1.0, "mask": m[:5]}])
    evaluator.add_detections(3, [{"category_id": 1, "score": 1.0, "rle": _rle(m)}])
    with pytest.raises(ValueError, match="without ground truth registered: \\[3\\]"):
        evaluator.evaluate()
