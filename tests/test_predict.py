"""`solov2 predict` on real SavedModels: a tiny random SOLOv2 export and a known-answer model.

The tiny model (exported like tests/test_export.py, with thresholds low enough for an untrained
model to detect) checks that the CLI's results are exactly `serving_bytes` + `paste_masks`. The
known-answer model returns fixed rectangles, which checks the overlay pixels themselves.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from models import export
from models.postprocess import paste_masks
from models.preprocess import decode_image, resized_shape
from models.solov2 import build_model
from models.visualize import instance_color, overlay_instances
from pipeline import predict
from pipeline.cli import main
from tests import train_utils
from tests.oracle_model import serving_layout_masks

CATEGORY_MAP = [
    {"index": i, "coco_id": coco_id, "name": name}
    for i, (coco_id, name) in enumerate(
        [(3, "ant"), (5, "bee"), (8, "cow"), (13, "dog"), (21, "eel")]
    )
]


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """`[height, width, 3]` uint8: blobs, so that JPEG keeps the content recognisable."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _decoded(path) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(tf.constant(f.read())).numpy()


def _results_by_image(output_dir) -> dict[int, list[dict]]:
    with open(os.path.join(output_dir, predict.RESULTS_FILE)) as f:
        results = json.load(f)
    by_image: dict[int, list[dict]] = {}
    for result in results:
        by_image.setdefault(result["image_id"], []).append(result)
    return by_image


@pytest.fixture(scope="module")
def pushed_model(tmp_path_factory) -> str:
    """A Pusher-style root `serving/solov2/<version>/` holding a tiny random SOLOv2 export."""
    model_config = dataclasses.replace(
        train_utils.tiny_config().model, score_threshold=0.005, update_threshold=0.001
    )
    keras.utils.set_random_seed(3)
    root = tmp_path_factory.mktemp("serving") / "solov2"
    export.export_saved_model(
        build_model(model_config), model_config, str(root / "1700000000"), CATEGORY_MAP
    )
    (root / "tmp-1700000001").mkdir()  # A push in progress: not a version.
    return str(root)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """Two PNGs and a JPEG of different sizes, a corrupt .jpg, and a file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "a.png").write_bytes(_encode(_smooth_image(90, 120, 0), "PNG"))
    (folder / "b.jpg").write_bytes(_encode(_smooth_image(64, 200, 1), "JPEG"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "c.png").write_bytes(_encode(_smooth_image(150, 100, 2), "PNG"))
    (folder / "notes.txt").write_text("ignored")
    return str(folder)


def test_predict_cli_writes_what_serving_bytes_and_paste_masks_give(
    pushed_model, image_dir, tmp_path, capsys
):
    loaded = tf.saved_model.load(os.path.join(pushed_model, "1700000000"))
    serve = loaded.signatures["serving_bytes"]
    names = [c["name"] for c in CATEGORY_MAP]
    # Sorted folder listing without the corrupt file, in the CLI's batches of 2; ids = index in
    # the listing (a.png, b.jpg, broken.jpg, c.png).
    batches = [["a.png", "b.jpg"], ["c.png"]]
    ids = {"a.png": 0, "b.jpg": 1, "c.png": 3}
    want = {}
    for batch in batches:
        encoded = []
        for name in batch:
            with open(os.path.join(image_dir, name), "rb") as f:
                encoded.append(f.read())
        outputs = serve(images=tf.constant(encoded))
        for i, name in enumerate(batch):
            n = int(outputs["num_detections"][i])
            want[name] = {
                "masks": paste_masks(outputs["masks"][i, :n], outputs["image_info"][i]).numpy(),
                "scores": outputs["scores"][i, :n].numpy(),
                "classes": outputs["classes"][i, :n].numpy(),
                "category_ids": outputs["category_ids"][i, :n].numpy(),
            }
    assert all(len(w["scores"]) > 3 for w in want.values())
    threshold = float(want["a.png"]["scores"][2])  # a.png draws exactly 3 detections.

    output_dir = tmp_path / "predictions"
    code = main(
        ["predict", image_dir]
        + ["--model", pushed_model, "--output-dir", str(output_dir), "--batch-size", "2"]
        + ["--score-threshold", repr(threshold)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    total = sum(len(w["scores"]) for w in want.values())
    drawn = sum(int((w["scores"] >= threshold).sum()) for w in want.values())
    assert "3 predicted, 1 skipped" in printed
    assert f"skipped {os.path.join(image_dir, 'broken.jpg')}: not a decodable JPEG/PNG" in printed
    assert f"Detections: {total} in coco_results.json, {drawn} drawn" in printed

    assert sorted(os.listdir(output_dir)) == [
        "a.png",
        "b.png",
        "c.png",
        "coco_results.json",
        "images.json",
    ]
    with open(output_dir / "images.json") as f:
        images = json.load(f)
    assert images == [
        {"id": 0, "file_name": "a.png", "height": 90, "width": 120},
        {"id": 1, "file_name": "b.jpg", "height": 64, "width": 200},
        {"id": 3, "file_name": "c.png", "height": 150, "width": 100},
    ]

    # coco_results.json: every detection (no threshold), masks exactly the pasted ones.
    by_image = _results_by_image(output_dir)
    assert set(by_image) == set(ids.values())
    for name, image_id in ids.items():
        results, expected = by_image[image_id], want[name]
        assert len(results) == len(expected["scores"])
        got_masks = mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1)
        np.testing.assert_array_equal(got_masks, expected["masks"])
        np.testing.assert_array_equal([r["category_id"] for r in results], expected["category_ids"])
        np.testing.assert_allclose([r["score"] for r in results], expected["scores"], rtol=1e-6)
        boxes = mask_utils.toBbox(
            mask_utils.encode(np.asfortranarray(got_masks.transpose(1, 2, 0)))
        )
        np.testing.assert_array_equal([r["bbox"] for r in results], boxes)
        assert all(isinstance(r["segmentation"]["counts"], str) for r in results)

    # pycocotools takes the files as they are.
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": images,
        "annotations": [],
        "categories": [{"id": c["coco_id"], "name": c["name"]} for c in CATEGORY_MAP],
    }
    ground_truth.createIndex()
    loaded_results = ground_truth.loadRes(str(output_dir / "coco_results.json"))
    assert len(loaded_results.getAnnIds()) == total
    assert {a["image_id"] for a in loaded_results.dataset["annotations"]} == set(ids.values())
    first = loaded_results.loadAnns(loaded_results.getAnnIds(imgIds=[1]))[0]
    np.testing.assert_array_equal(loaded_results.annToMask(first), want["b.jpg"]["masks"][0])

    # Overlays: the original image at its size, with the detections above the threshold drawn
    # most confident last (on top), each in its rank's colour.
    for name, stem in (("a.png", "a"), ("b.jpg", "b"), ("c.png", "c")):
        expected = want[name]
        keep = np.flatnonzero(expected["scores"] >= threshold)[::-1]
        picture = np.array(Image.open(output_dir / f"{stem}.png"))
        original = _decoded(os.path.join(image_dir, name))
        assert picture.shape == original.shape
        np.testing.assert_array_equal(
            picture,
            overlay_instances(
                original,
                expected["masks"][keep],
                [names[c] for c in expected["classes"][keep]],
                expected["scores"][keep],
                colors=[instance_color(int(k)) for k in keep],
            ),
        )
    assert len(np.flatnonzero(want["a.png"]["scores"] >= threshold)) == 3


class _FixedDetections(tf.Module):
    """A `serving_bytes` model that detects the same objects on every image of one size."""

    def __init__(self, masks, scores, classes, class_names, category_ids, short_side, max_size):
        super().__init__()
        self._short_side, self._max_size = short_side, max_size
        self.masks = tf.constant(masks, tf.uint8)  # [K, P/4, P/4]
        self.scores = tf.constant(scores, tf.float32)
        self.classes = tf.constant(classes, tf.int32)
        self.category_ids = tf.constant(category_ids, tf.int32)
        self.class_names = tf.Variable(class_names, dtype=tf.string, trainable=False)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve(self, images):
        original = tf.map_fn(
            lambda encoded: tf.shape(decode_image(encoded))[:2],
            images,
            fn_output_signature=tf.TensorSpec([2], tf.int32),
        )
        height, width = resized_shape(
            original[:, 0], original[:, 1], self._short_side, self._max_size
        )
        batch = tf.shape(images)[0]

        def tiled(value):
            return tf.tile(
                value[tf.newaxis], tf.concat([[batch], tf.ones_like(tf.shape(value))], 0)
            )

        return {
            "masks": tiled(self.masks),
            "scores": tiled(self.scores),
            "classes": tiled(self.classes),
            "category_ids": tiled(self.category_ids),
            "num_detections": tf.fill([batch], tf.shape(self.scores)[0]),
            "image_info": tf.stack([original[:, 0], original[:, 1], height, width], axis=1),
        }


HEIGHT, WIDTH = 96, 128  # At short side 128, max 128: resized 96 x 128, padded 128, masks 32.


def _rectangle(top, left, bottom, right) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


@pytest.fixture(scope="module")
def known_model(tmp_path_factory) -> str:
    """Detects a "cow" (COCO id 8) on rows 32..71 x columns 40..103, score 0.9, and an "ant"
    (id 3) on rows 4..19 x columns 8..39, score 0.2. Edges on multiples of 4 survive the 1/4
    serving masks exactly."""
    masks = np.stack([_rectangle(32, 40, 72, 104), _rectangle(4, 8, 20, 40)])
    module = _FixedDetections(
        serving_layout_masks(masks, HEIGHT, WIDTH, short_side=128, max_size=128),
        scores=[0.9, 0.2],
        classes=[2, 0],
        class_names=["ant", "bee", "cow"],
        category_ids=[8, 3],
        short_side=128,
        max_size=128,
    )
    export_dir = str(tmp_path_factory.mktemp("known") / "model")
    tf.saved_model.save(module, export_dir, signatures={"serving_bytes": module.serve})
    return export_dir


def test_overlay_shows_the_known_detection_at_its_pixels(known_model, tmp_path, capsys):
    scene = _smooth_image(HEIGHT, WIDTH, 5)
    (tmp_path / "scene.png").write_bytes(_encode(scene, "PNG"))
    (tmp_path / "other.png").write_bytes(_encode(_smooth_image(HEIGHT, WIDTH, 6), "PNG"))
    (tmp_path / "unlisted.png").write_bytes(_encode(scene, "PNG"))
    annotations = tmp_path / "instances.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 42, "file_name": "val/scene.png", "height": HEIGHT, "width": WIDTH},
                    {"id": 7, "file_name": "val/other.png", "height": HEIGHT, "width": WIDTH},
                ],
                "annotations": [],
                "categories": [],
            }
        )
    )
    output_dir = tmp_path / "out"
    code = main(
        ["predict"]
        + [str(tmp_path / name) for name in ("scene.png", "other.png", "unlisted.png")]
        + ["--model", known_model, "--output-dir", str(output_dir)]
        + ["--annotations", str(annotations)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "unlisted.png: no image of that file name in --annotations" in printed

    with open(output_dir / "images.json") as f:
        assert [(r["id"], r["file_name"]) for r in json.load(f)] == [
            (42, "val/scene.png"),
            (7, "val/other.png"),
        ]
    by_image = _results_by_image(output_dir)
    assert set(by_image) == {42, 7}
    for results in by_image.values():
        assert [r["category_id"] for r in results] == [8, 3]
        np.testing.assert_allclose([r["score"] for r in results], [0.9, 0.2], rtol=1e-6)
        assert [r["bbox"] for r in results] == [[40, 32, 64, 40], [8, 4, 32, 16]]
        masks = mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1)
        # Bilinear x4 gives 0.625 on the rows and columns next to an edge, 0.625^2 < 0.5 at
        # the four corners: the pasted cow is the rectangle without its corner pixels.
        cow = _rectangle(32, 40, 72, 104)
        cow[[32, 32, 71, 71], [40, 103, 40, 103]] = 0
        np.testing.assert_array_equal(masks[0], cow)

    picture = np.array(Image.open(output_dir / "scene.png"))
    assert picture.shape == (HEIGHT, WIDTH, 3)
    cow = _rectangle(32, 40, 72, 104).astype(bool)
    color = instance_color(0)
    # Inside the cow, clear of its 2-px outline (3 px near the cut corners) and of the label at
    # its top-left (y 32, x 40).
    inside = np.zeros_like(cow)
    inside[50:69, 43:100] = True
    np.testing.assert_array_equal(
        picture[inside], np.floor(0.5 * scene[inside] + 0.5 * np.array(color) + 0.5)
    )
    np.testing.assert_array_equal(picture[70:72, 42:102], np.broadcast_to(color, (2, 60, 3)))
    np.testing.assert_array_equal(picture[32:34, 40:44], np.broadcast_to(color, (2, 4, 3)))
    # The ant (score 0.2 < 0.3) is not drawn: everything outside the cow is the original.
    np.testing.assert_array_equal(picture[~cow], scene[~cow])


def test_model_folder_resolution(tmp_path):
    def version(name: str, complete: bool = True) -> None:
        (tmp_path / "root" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "root" / name / "saved_model.pb").write_bytes(b"")

    version("7")
    version("12")
    version("100", complete=False)  # Not a SavedModel (yet): skipped.
    version("999-tmp")
    root = str(tmp_path / "root")
    assert predict.resolve_saved_model(root) == os.path.join(root, "12")  # Numeric order.
    assert predict.resolve_saved_model(os.path.join(root, "7")) == os.path.join(root, "7")
    with pytest.raises(predict.PredictError, match="no SavedModel in"):
        predict.resolve_saved_model(os.path.join(root, "100"))
    with pytest.raises(predict.PredictError, match="does not exist"):
        predict.resolve_saved_model(str(tmp_path / "missing"))


def test_cli_reports_bad_arguments(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(_encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(image), "--model", str(tmp_path / "nope")], "model folder .* does not exist"),
        ([str(image), "--model", str(tmp_path / "empty")], "no SavedModel in"),
        ([str(tmp_path / "empty"), "--model", str(tmp_path)], "no .jpg/.jpeg/.png images in"),
        ([str(image), "--model", str(tmp_path), "--batch-size", "0"], "--batch-size must be"),
    ]
    for argv, message in cases:
        assert main(["predict", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("solov2 predict: ")
        assert re.search(message, err), err
