"""Evaluation analysis tools on hand-made cases: the mask-resolution ceiling
(`benchmarks/mask_ceiling.py`) and the class analysis of `scripts/learning_curve.py`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.mask_ceiling import mask_ceiling, oracle_masks
from scripts.learning_curve import ERROR_KINDS, class_analysis, curve_config, error_breakdown


def _square(y: int, x: int, size: int, image: int = 64) -> np.ndarray:
    mask = np.zeros((image, image), np.uint8)
    mask[y : y + size, x : x + size] = 1
    return mask


def test_a_mask_on_the_4_pixel_grid_comes_back_without_its_corners():
    """A square on the 4-pixel grid is exact at 1/4 scale (both oracles). Bilinear x4 with
    half-pixel centres gives an edge pixel 0.625 of its cell (kept, > 0.5) and a corner pixel
    0.625^2 = 0.39 (dropped): the pasted mask is the square without its 4 corner pixels."""
    mask = _square(8, 12, 40)  # 64 x 64 image, no resize (short side 64), pad 64.
    expected = mask.astype(bool)
    for y, x in ((8, 12), (8, 51), (47, 12), (47, 51)):
        expected[y, x] = False
    for oracle, pasted in oracle_masks(mask, 64, 64).items():
        np.testing.assert_array_equal(pasted, expected, err_msg=oracle)


def test_a_two_pixel_object_is_lost_by_the_binary_target():
    """downsample_masks samples rows/columns 4d+1 and 4d+2 and needs 2 of the 4 on: a 2 x 2
    square at (0, 0) covers only pixel (1, 1) of those, so its target is empty; the soft
    block mean (4/16) pastes back to a small blob, not nothing."""
    mask = _square(0, 0, 2)
    pasted = oracle_masks(mask, 64, 64)
    assert not pasted["target"].any()


def _write_coco(path, masks_by_image, crowd=(), categories=None):
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for image_id, masks in enumerate(masks_by_image, start=1):
        images.append({"id": image_id, "height": 64, "width": 64, "file_name": f"{image_id}.jpg"})
        for mask in masks:
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[len(annotations)] if categories else 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(len(annotations) in crowd),
                }
            )
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "other"}],
            }
        )
    )
    return str(path)


def test_ceiling_ap_of_exact_and_lost_objects(tmp_path):
    """Two images: a grid-aligned 40 x 40 square (medium; IoU 1596/1600 with both oracles)
    and a 2 x 2 square (small; lost by the target oracle). The target oracle finds 1 of 2
    objects at precision 1: COCO's 101-point precision is 1 up to recall 0.5, 0 after, so
    AP50 = 51/101; medium AP 1, small AP 0."""
    path = _write_coco(tmp_path / "gt.json", [[_square(8, 12, 40)], [_square(0, 0, 2)]])
    result = mask_ceiling(path, 64, 64)
    assert result["images"] == 2 and result["instances"] == 2
    assert result["target"]["AP50"] == pytest.approx(51 / 101)
    assert result["target"]["APm"] == pytest.approx(1.0)
    assert result["target"]["APs"] == pytest.approx(0.0)
    assert result["soft"]["APm"] == pytest.approx(1.0)


def test_crowd_regions_are_not_scored_and_no_instances_gives_minus_one(tmp_path):
    path = _write_coco(tmp_path / "gt.json", [[_square(8, 12, 40)]], crowd=(0,))
    result = mask_ceiling(path, 64, 64)
    assert result["instances"] == 0
    assert result["target"]["AP"] == -1.0 and result["soft"]["AP"] == -1.0


def test_class_analysis_separates_wrong_classes_from_wrong_masks(tmp_path):
    """Exact masks: the one with the wrong class costs AP as is, not class-agnostic or with
    perfect classes. A detection on no object costs all three."""
    from pycocotools import mask as mask_utils

    squares = [_square(8, 12, 40), _square(0, 0, 8)]
    path = _write_coco(tmp_path / "gt.json", [squares], categories=[1, 2])

    def detection(mask, category_id, score):
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        return {"image_id": 1, "category_id": category_id, "segmentation": rle, "score": score}

    swapped = [detection(squares[0], 1, 0.9), detection(squares[1], 1, 0.8)]  # 2nd: class 2
    result = class_analysis(path, swapped, None)
    assert result["class_agnostic"]["AP"] == pytest.approx(1.0)
    assert result["perfect_classes"]["AP"] == pytest.approx(1.0)
    # Category 1: one true positive then one false positive (AP 1); category 2: no detection
    # of its one object (AP 0). Mean over categories: 0.5.
    assert result["as_is"]["AP"] == pytest.approx(0.5)
    missed = [detection(squares[0], 1, 0.9), detection(_square(40, 40, 8), 2, 0.8)]
    result = class_analysis(path, missed, None)
    assert result["class_agnostic"]["AP50"] == pytest.approx(51 / 101, abs=1e-4)  # 4 decimals
    assert result["perfect_classes"]["AP"] < 1.0
    nothing = class_analysis(path, [], None)
    assert all(stats["AP"] == 0.0 for stats in nothing.values())


def test_curve_config_keeps_the_recipe_schedule_unless_a_decay_epoch_is_given():
    """The default must stay valid whatever the recipe's epoch count (an old default of
    `lr_steps=(49,)` broke when demo_cpu went to 18 epochs)."""
    from models.config import get_experiment

    recipe = get_experiment("demo_cpu").train
    assert curve_config("demo_cpu", {}, None).train == recipe
    decayed = curve_config("demo_cpu", {"train": {"epochs": 60}}, 55).train
    assert (decayed.epochs, decayed.lr_steps) == (60, (55,))
    overrides = {"train": {"base_lr": 0.002}}
    assert curve_config("demo_cpu", overrides, 10).train.lr_steps == (10,)
    assert overrides == {"train": {"base_lr": 0.002}}  # The caller's dict is not changed.
    with pytest.raises(ValueError, match="lr_steps"):
        curve_config("demo_cpu", {}, recipe.epochs)


def test_error_breakdown_sorts_detections_by_kind(tmp_path):
    """Image 1: a 40 x 40 square (class 1) and an 8 x 8 one (class 2); image 2: no object.
    Six detections, best score first: the big square right (true positive), again (duplicate),
    with class 2 (wrong class), a square overlapping it by IoU 288 / 1888 (poor localisation), one far
    from both (background), and one on the empty image (background). `top` cuts the list."""
    from pycocotools import mask as mask_utils

    big, small = _square(8, 12, 40), _square(0, 0, 8)
    path = _write_coco(tmp_path / "gt.json", [[big, small], []], categories=[1, 2])

    def detection(mask, category_id, score, image_id=1):
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        return {
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": rle,
            "score": score,
        }

    detections = [
        detection(big, 1, 0.9),
        detection(big, 1, 0.8),
        detection(big, 2, 0.7),
        detection(_square(8, 40, 24), 1, 0.6),
        detection(_square(52, 0, 10), 1, 0.5),
        detection(big, 1, 0.4, image_id=2),
    ]
    result = error_breakdown(path, detections, top=10)
    assert result["top"] == 6
    assert {kind: result[kind] for kind in ERROR_KINDS} == {
        "true_positive": 1,
        "duplicate": 1,
        "wrong_class": 1,
        "poor_localisation": 1,
        "background": 2,
    }
    assert result["confusion"] == {"square -> other": 1, "square -> square": 2}
    assert error_breakdown(path, detections, top=1)["true_positive"] == 1
    assert error_breakdown(path, [], top=5)["top"] == 0
