"""benchmarks/mask_ceiling.py: oracle AP of stride-4 masks, checked on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.mask_ceiling import mask_ceiling, oracle_masks


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


def _write_coco(path, masks_by_image, crowd=()):
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
                    "category_id": 1,
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
                "categories": [{"id": 1, "name": "square"}],
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
