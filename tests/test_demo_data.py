"""Demo dataset: deterministic, real COCO, annotations exactly equal to what was painted."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.demo_data import (
    NUM_SIZE_BUCKETS,
    SPLITS,
    _image_rng,
    _mask_to_polygons,
    _render_image,
    _resize_factors,
    _uncompressed_rle,
    generate_demo_dataset,
)

# Five images per split: image i holds one object of scale bucket i % 5, so every bucket shows up.
NUM_TRAIN, NUM_VAL, SEED = 6, 5, 3
SOLO_SCALE_RANGES = ((1, 32), (16, 64), (32, 128), (64, 256), (128, 512))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    summary = generate_demo_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=SEED)
    cocos = {split: COCO(summary["splits"][split]["annotation_file"]) for split in SPLITS}
    return root, summary, cocos


def _all_files(root: str) -> dict[str, bytes]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_demo_dataset(tmp_path / name, num_train=3, num_val=2, seed=seed)
    first, again, other = (_all_files(str(tmp_path / n)) for n in "abc")
    assert (
        sorted(first)
        == sorted(other)
        == [
            "annotations/instances_train.json",
            "annotations/instances_val.json",
            "train/000001.jpg",
            "train/000002.jpg",
            "train/000003.jpg",
            "val/000001.jpg",
            "val/000002.jpg",
        ]
    )
    assert first == again
    assert all(first[name] != other[name] for name in first)


def test_summary_counts_match_the_files(dataset):
    root, summary, cocos = dataset
    assert summary["root"] == root
    assert [c["id"] for c in summary["categories"]] == sorted(cocos["train"].getCatIds())
    for split, num_images in zip(SPLITS, (NUM_TRAIN, NUM_VAL)):
        counts, coco = summary["splits"][split], cocos[split]
        assert counts["num_images"] == len(coco.getImgIds()) == num_images
        assert counts["num_annotations"] == len(coco.getAnnIds())
        assert counts["num_crowd"] == len(coco.getAnnIds(iscrowd=True))
        assert counts["image_dir"] == os.path.join(root, split)


def test_scale_multiplies_image_counts(tmp_path):
    summary = generate_demo_dataset(tmp_path, num_train=1, num_val=1, scale=2)
    assert [summary["splits"][s]["num_images"] for s in SPLITS] == [2, 2]


@pytest.mark.parametrize("kwargs", [{"scale": 0}, {"num_train": -1}, {"num_val": -2}, {"seed": -1}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, **kwargs)


@pytest.mark.parametrize("split", SPLITS)
def test_real_coco_structure_and_ids(dataset, split):
    root, _, cocos = dataset
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        data = json.load(f)
    assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
    category_ids = [c["id"] for c in data["categories"]]
    assert len(category_ids) >= 3
    assert category_ids != list(range(1, len(category_ids) + 1))  # Non-contiguous, as in COCO.
    assert all({"id", "name", "supercategory"} <= set(c) for c in data["categories"])

    image_ids = [image["id"] for image in data["images"]]
    assert image_ids == list(range(1, len(image_ids) + 1))
    assert all(image["file_name"] == f"{split}/{image['id']:06d}.jpg" for image in data["images"])
    annotation_ids = [a["id"] for a in data["annotations"]]
    assert annotation_ids == list(range(1, len(annotation_ids) + 1))
    for annotation in data["annotations"]:
        assert set(annotation) == {
            "id",
            "image_id",
            "category_id",
            "segmentation",
            "area",
            "bbox",
            "iscrowd",
        }
        assert annotation["image_id"] in image_ids
        assert annotation["category_id"] in category_ids
    per_image = [len(cocos[split].getAnnIds(imgIds=i)) for i in image_ids]
    assert min(per_image) >= 2 and max(per_image) <= 8


@pytest.mark.parametrize("split", SPLITS)
def test_images_are_rgb_jpegs_of_the_declared_size(dataset, split):
    root, _, cocos = dataset
    for info in cocos[split].dataset["images"]:
        with Image.open(os.path.join(root, info["file_name"])) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (info["width"], info["height"])
        assert 224 <= min(info["height"], info["width"]) <= 288
        assert 256 <= max(info["height"], info["width"]) <= 352


@pytest.mark.parametrize("split", SPLITS)
def test_every_annotation_decodes_to_its_visible_region(dataset, split):
    _, _, cocos = dataset
    coco = cocos[split]
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        rendered = _render_image(_image_rng(SEED, split, index), index)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(annotations) == len(rendered.instances)
        info = coco.imgs[image_id]
        assert rendered.label_map.shape == (info["height"], info["width"])
        for annotation, instance in zip(annotations, rendered.instances):
            visible = rendered.label_map == instance.label
            decoded = coco.annToMask(annotation).astype(bool)
            assert np.array_equal(decoded, visible), (image_id, annotation["id"])
            assert annotation["category_id"] == instance.category_id
            assert annotation["iscrowd"] == int(instance.iscrowd)

            rle = coco.annToRLE(annotation)
            assert annotation["area"] == mask_utils.area(rle) == np.count_nonzero(visible)
            rows, cols = np.nonzero(visible)
            x, y = cols.min(), rows.min()
            w, h = cols.max() - x + 1, rows.max() - y + 1
            assert annotation["bbox"] == [x, y, w, h]


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_has_multipart_polygons_and_crowd_rle(dataset, split):
    _, _, cocos = dataset
    annotations = cocos[split].dataset["annotations"]
    multipart = [
        a for a in annotations if isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1
    ]
    assert multipart and all(a["iscrowd"] == 0 for a in multipart)
    crowd = [a for a in annotations if a["iscrowd"]]
    assert crowd
    for annotation in crowd:
        rle = annotation["segmentation"]
        info = cocos[split].imgs[annotation["image_id"]]
        assert set(rle) == {"counts", "size"} and rle["size"] == [info["height"], info["width"]]
        assert all(isinstance(c, int) for c in rle["counts"])
        assert sum(rle["counts"]) == info["height"] * info["width"]
    for annotation in annotations:
        if not annotation["iscrowd"]:
            assert isinstance(annotation["segmentation"], list)
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in annotation["segmentation"])


@pytest.mark.parametrize("split", SPLITS)
def test_object_scales_cover_every_solov2_range(dataset, split):
    _, _, cocos = dataset
    coco = cocos[split]
    for factor_kind in (0, 1):  # Training resize (long side <= 352), and plain short side 256.
        scales = []
        for annotation in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            info = coco.imgs[annotation["image_id"]]
            factor = _resize_factors(info["height"], info["width"])[factor_kind]
            _, _, w, h = annotation["bbox"]
            scales.append(math.sqrt(w * h) * factor)
        scales = np.array(scales)
        for low, high in SOLO_SCALE_RANGES:
            assert np.any((scales >= low) & (scales <= high)), (low, high)
        # Exclusive bands: tiny, small, medium, large, very large.
        for low, high in ((0, 16), (16, 32), (32, 64), (64, 128), (150, math.inf)):
            assert np.any((scales >= low) & (scales < high)), (low, high)


@pytest.mark.parametrize("split", SPLITS)
def test_only_the_guaranteed_object_is_tiny(dataset, split):
    """Objects under 16 px come only from the guaranteed bucket-0 object (image index % 5 == 0):
    the extras are drawn from 32 px and up, and even the most occluded one (45% of its area
    left) cannot fit a 16 px box."""
    _, _, cocos = dataset
    coco = cocos[split]
    for image_id, info in coco.imgs.items():
        factor = _resize_factors(info["height"], info["width"])[0]
        tiny = [
            annotation
            for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
            if math.sqrt(annotation["bbox"][2] * annotation["bbox"][3]) * factor < 16
        ]
        assert len(tiny) == (1 if (image_id - 1) % NUM_SIZE_BUCKETS == 0 else 0), image_id


def test_mask_to_polygons_is_exact_for_holes_and_diagonal_contacts():
    rng = np.random.default_rng(0)
    masks = [rng.random((17, 23)) < p for p in (0.3, 0.5, 0.7)]
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    ring[5:7, 5:7] = True  # An island inside the hole.
    checker = (np.indices((6, 6)).sum(axis=0) % 2 == 0) & (np.arange(6) < 5)
    for mask in [*masks, ring, checker]:
        polygons = _mask_to_polygons(mask)
        h, w = mask.shape
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
        assert np.array_equal(decoded.astype(bool), mask)
    assert len(_mask_to_polygons(ring)) == 2


def test_uncompressed_rle_round_trips_masks_that_start_with_foreground():
    mask = np.zeros((5, 7), bool)
    mask[0, 0] = mask[2:4, 3:6] = True
    rle = _uncompressed_rle(mask)
    assert rle["counts"][0] == 0 and rle["size"] == [5, 7]
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 5, 7))
    assert np.array_equal(decoded.astype(bool), mask)


def test_cli_if_missing_regenerates_when_the_set_differs(tmp_path, capsys):
    """`make run` uses `--if-missing`: a demo set of other image counts (an older default), of
    another seed, or from an older generator must not be reused; the epoch-based recipe would
    train for fewer steps than it says, or on data its results were not measured on."""
    from pipeline import cli

    train_file = tmp_path / "annotations" / "instances_train.json"

    def train_images():
        with open(train_file) as f:
            return len(json.load(f)["images"])

    args = ["demo-data", str(tmp_path), "--num-train", "2", "--num-val", "1", "--if-missing"]
    assert cli.main(args) == 0
    assert train_images() == 2
    assert cli.main(args) == 0
    assert "already" in capsys.readouterr().out
    assert cli.main([*args[:3], "3", *args[4:]]) == 0
    assert train_images() == 3
    assert "Wrote" in capsys.readouterr().out
    three = [*args[:3], "3", *args[4:]]
    assert cli.main([*three, "--seed", "1"]) == 0
    assert "Wrote" in capsys.readouterr().out
    with open(train_file) as f:
        coco = json.load(f)
    coco["info"]["version"] = "1.0"  # A set written by the previous generator.
    with open(train_file, "w") as f:
        json.dump(coco, f)
    assert cli.main([*three, "--seed", "1"]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert cli.main([*three, "--seed", "1"]) == 0
    assert "already" in capsys.readouterr().out
