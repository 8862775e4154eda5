"""Export tests: save -> load -> compare, signature specs, preprocessing parity, empty outputs.

The model is a random-initialised tiny SOLOv2 exported with low score / update thresholds so
that the whole detection path (candidates, masks, Matrix NMS, padding) produces detections.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from components.solo_targets.transform import decode_training_example
from models import export, preprocess
from models.postprocess import paste_masks
from models.solov2 import build_model
from schemas import features
from tests import train_utils

OUTPUT_KEYS = {"masks", "scores", "classes", "category_ids", "num_detections", "image_info"}


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> str:
    return train_utils.shared_training_examples(tmp_path_factory)


@pytest.fixture(scope="module")
def model_config():
    # Thresholds low enough for an untrained model (category prior 0.01) to detect something.
    return dataclasses.replace(
        train_utils.tiny_config().model, score_threshold=0.005, update_threshold=0.001
    )


@pytest.fixture(scope="module")
def model(model_config):
    keras.utils.set_random_seed(3)
    return build_model(model_config)


@pytest.fixture(scope="module")
def exported(examples_dir, model, model_config, tmp_path_factory):
    serving_dir = str(tmp_path_factory.mktemp("export") / "serving")
    category_map = train_utils.read_category_map(examples_dir)
    module = export.export_saved_model(model, model_config, serving_dir, category_map)
    return module, tf.saved_model.load(serving_dir), serving_dir


@pytest.fixture(scope="module")
def images(examples_dir) -> list[bytes]:
    """A JPEG (original demo image) and a PNG of another size and aspect ratio."""
    jpeg, other = train_utils.encoded_images(train_utils.read_split(examples_dir, "train"))[:2]
    resized = Image.open(io.BytesIO(other)).resize((300, 150))
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return [jpeg, buffer.getvalue()]


def _serialized_examples(encoded: list[bytes]) -> tf.Tensor:
    examples = [
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    features.IMAGE_ENCODED: tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[e])
                    )
                }
            )
        ).SerializeToString()
        for e in encoded
    ]
    return tf.constant(examples)


def _assert_outputs_equal(got, want):
    assert set(got) == OUTPUT_KEYS
    for key in ("num_detections", "classes", "category_ids", "image_info"):
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), rtol=1e-5, atol=1e-7)
    masks_diff = np.abs(got["masks"].numpy().astype(int) - want["masks"].numpy().astype(int))
    assert masks_diff.max() <= 1  # One quantisation step at most.


def test_signature_specs_are_single_string_vectors(exported, model_config):
    _, loaded, _ = exported
    quarter = preprocess.padded_size(model_config.image_max_size) // 4
    k = model_config.max_detections
    want_outputs = {
        "masks": ([None, k, quarter, quarter], tf.uint8),
        "scores": ([None, k], tf.float32),
        "classes": ([None, k], tf.int32),
        "category_ids": ([None, k], tf.int32),
        "num_detections": ([None], tf.int32),
        "image_info": ([None, 4], tf.int32),
    }
    for name, input_name in (("serving_default", "examples"), ("serving_bytes", "images")):
        signature = loaded.signatures[name]
        args, kwargs = signature.structured_input_signature
        assert args == ()
        assert list(kwargs) == [input_name]
        spec = kwargs[input_name]
        assert spec.shape.as_list() == [None] and spec.dtype == tf.string
        outputs = {
            key: (spec.shape.as_list(), spec.dtype)
            for key, spec in signature.structured_outputs.items()
        }
        assert outputs == want_outputs


def test_loaded_signatures_match_in_memory_model(exported, images):
    module, loaded, _ = exported
    want = module.serve_images(tf.constant(images))
    assert want["num_detections"].numpy().min() > 0  # The comparison covers real detections.
    sizes = [Image.open(io.BytesIO(e)).size[::-1] for e in images]  # (height, width)
    assert sizes[0] != sizes[1]
    np.testing.assert_array_equal(want["image_info"].numpy()[:, :2], sizes)
    _assert_outputs_equal(loaded.signatures["serving_bytes"](images=tf.constant(images)), want)
    _assert_outputs_equal(
        loaded.signatures["serving_default"](examples=_serialized_examples(images)), want
    )


def test_category_map_is_embedded(exported, examples_dir, images):
    _, loaded, serving_dir = exported
    category_map = train_utils.read_category_map(examples_dir)
    np.testing.assert_array_equal(loaded.category_ids.numpy(), [c["coco_id"] for c in category_map])
    assert [n.decode() for n in loaded.class_names.numpy()] == [c["name"] for c in category_map]
    with open(os.path.join(serving_dir, export.CATEGORY_MAP_ASSET)) as f:
        assert json.load(f)["categories"] == category_map
    out = loaded.signatures["serving_bytes"](images=tf.constant(images))
    classes, category_ids = out["classes"].numpy(), out["category_ids"].numpy()
    lookup = np.array([c["coco_id"] for c in category_map])
    np.testing.assert_array_equal(category_ids, np.where(classes >= 0, lookup[classes], -1))


def test_training_decoder_and_serving_feed_the_model_the_same_image(examples_dir, model_config):
    """Eval variant (test scale, no flip) of the training decoder == serving input, bitwise."""
    config = train_utils.tiny_config()
    eval_examples = train_utils.read_split(examples_dir, "eval")
    serving_images, image_info = export.serving_inputs(
        tf.constant(train_utils.encoded_images(eval_examples)), model_config
    )
    for i, example in enumerate(eval_examples):
        decoded = decode_training_example(
            tf.constant(example.SerializeToString()),
            max_size=config.train.train_max_size,
            num_cells=config.model.num_cells,
            random_variant=False,
        )
        np.testing.assert_array_equal(decoded["images"].numpy(), serving_images[i].numpy())
        resized = example.features.feature[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value
        resized_w = example.features.feature[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value
        assert list(image_info[i].numpy()[2:]) == [resized[0], resized_w[0]]


def test_paste_masks_maps_detections_onto_the_original_image(exported, images):
    _, loaded, _ = exported
    out = loaded.signatures["serving_bytes"](images=tf.constant(images))
    for i, encoded in enumerate(images):
        height, width = Image.open(io.BytesIO(encoded)).size[::-1]
        n = int(out["num_detections"][i])
        pasted = paste_masks(out["masks"][i][:n], out["image_info"][i])
        assert pasted.dtype == tf.bool and pasted.shape == (n, height, width)
        # Eager and graph callers (predict vs the evaluator's tf.function) paste identically.
        graph = tf.function(paste_masks)(out["masks"][i][:n], out["image_info"][i])
        np.testing.assert_array_equal(pasted.numpy(), graph.numpy())
        # uint8 serving masks paste like the float probabilities they encode, up to pixels
        # whose interpolated value ties with the threshold (float rounding differs there).
        floats = tf.cast(out["masks"][i][:n], tf.float32) / 255.0
        from_floats = paste_masks(floats, out["image_info"][i]).numpy()
        assert np.mean(pasted.numpy() != from_floats) <= 1e-4


def test_no_detections_give_zero_padded_outputs(model, examples_dir, images):
    """Official thresholds on an untrained model (all scores ~0.01 < 0.1): nothing detected."""
    config = train_utils.tiny_config().model
    module = export.SOLOv2Serving(
        model, config, export.normalize_category_map(None, config.num_classes)
    )
    out = module.serve_examples(_serialized_examples(images))
    np.testing.assert_array_equal(out["num_detections"].numpy(), [0, 0])
    np.testing.assert_array_equal(out["classes"].numpy(), -1)
    np.testing.assert_array_equal(out["category_ids"].numpy(), -1)
    np.testing.assert_array_equal(out["scores"].numpy(), 0.0)
    np.testing.assert_array_equal(out["masks"].numpy(), 0)
    assert out["masks"].shape == (2, config.max_detections, 32, 32)


def test_category_map_must_cover_every_class():
    with pytest.raises(ValueError, match="does not cover"):
        export.normalize_category_map([{"index": 0, "coco_id": 1, "name": "a"}], 2)
    records = export.normalize_category_map(
        {
            "categories": [
                {"index": 1, "coco_id": 9, "name": "b"},
                {"index": 0, "coco_id": 4, "name": "a"},
            ]
        },
        2,
    )
    assert [r["coco_id"] for r in records] == [4, 9]
