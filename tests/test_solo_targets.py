"""SoloTargetGen: variants, geometry agreement with the training decoder, degenerate counts."""

from __future__ import annotations

import glob
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils
from tfx.types import standard_artifacts

from components.solo_targets.component import SoloTargetGen, target_spec_for
from components.solo_targets.transform import (
    TargetMaker,
    TargetSpec,
    decode_rle_masks,
    decode_training_example,
)
from models import preprocess
from models.targets import compute_targets
from pipeline.demo_data import generate_demo_dataset
from schemas import features
from tests.example_gen_utils import read_examples, run_example_gen

DEMO_SPLITS = {
    "train": "annotations/instances_train.json",
    "eval": "annotations/instances_val.json",
}


@pytest.fixture(scope="module")
def demo_examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("solo_targets")
    generate_demo_dataset(str(root / "demo"), num_train=6, num_val=3)
    artifact = run_example_gen(str(root / "demo"), str(root / "eg"), split_files=DEMO_SPLITS)
    return artifact


@pytest.fixture(scope="module")
def target_artifact(demo_examples, tmp_path_factory):
    out = standard_artifacts.Examples()
    out.uri = str(tmp_path_factory.mktemp("targets_out"))
    SoloTargetGen.test_call(
        examples=demo_examples,
        targets=out,
        experiment="demo_cpu",
        train_split="train",
        beam_pipeline=beam.Pipeline(),
    )
    return out


def _tensor(example, key, k, dtype):
    return tf.io.parse_tensor(example.features.feature[key].bytes_list.value[k], dtype).numpy()


def test_component_writes_every_split_with_its_variants(demo_examples, target_artifact):
    assert json.loads(target_artifact.split_names) == ["train", "eval"]
    for split, expected_variants in (("train", [(256, 0), (256, 1)]), ("eval", [(256, 0)])):
        originals = read_examples(demo_examples.uri, split)
        written = read_examples(target_artifact.uri, split)
        assert len(written) == len(originals)
        for example in written:
            f = example.features.feature
            variants = list(
                zip(
                    f[features.SOLO_VARIANT_SHORT_SIDE].int64_list.value,
                    f[features.SOLO_VARIANT_FLIP].int64_list.value,
                )
            )
            assert variants == expected_variants
            assert f[features.SOLO_PADDED_SIZE].int64_list.value == [352]
            # The original features are kept unchanged.
            assert f[features.IMAGE_ENCODED].bytes_list.value
            n = len(f[features.OBJECT_CLASS].int64_list.value)
            assert _tensor(example, features.SOLO_INSTANCE_MASKS, 0, tf.uint8).shape == (n, 88, 88)
    assert os.path.exists(os.path.join(target_artifact.uri, features.CATEGORY_MAP_FILENAME))


def test_report_counts_every_instance(target_artifact):
    with open(os.path.join(target_artifact.uri, features.SOLO_TARGETS_REPORT_FILENAME)) as f:
        report = json.load(f)
    for split in ("train", "eval"):
        counts = report["splits"][split]
        degenerate = counts["crowd"] + counts["empty_mask"] + counts["empty_after_resize"]
        degenerate += counts["no_positive_cells"]
        assert degenerate + counts["positive_instances"] == counts["instances"]
        assert counts["crowd"] >= 1  # The demo data has crowd regions in both splits.
        props = target_artifact.mlmd_artifact.custom_properties
        assert props[f"{split}_instances"].int_value == counts["instances"]


def test_targets_equal_direct_computation_at_the_same_geometry(demo_examples):
    """Variant 0 of an example = compute_targets on masks resized and padded by preprocess."""
    spec = target_spec_for("demo_cpu", "train")
    maker = TargetMaker(spec)
    example = read_examples(demo_examples.uri, "train")[0]
    with_targets, _ = maker.add_targets(example)
    masks = decode_rle_masks(example)
    f = example.features.feature
    height, width = masks.shape[1:]
    new_h, new_w = (int(v) for v in preprocess.resized_shape(height, width, 256, 352))
    resized = tf.image.resize(masks[..., None], [new_h, new_w], method="nearest")[..., 0]
    padded = np.zeros((len(masks), 352, 352), np.uint8)
    padded[:, :new_h, :new_w] = resized.numpy()
    sy, sx = new_h / height, new_w / width
    boxes = np.stack(
        [
            np.array(f[features.OBJECT_YMIN].float_list.value) * sy,
            np.array(f[features.OBJECT_XMIN].float_list.value) * sx,
            np.array(f[features.OBJECT_YMAX].float_list.value) * sy,
            np.array(f[features.OBJECT_XMAX].float_list.value) * sx,
        ],
        axis=1,
    ).astype(np.float32)
    expected = compute_targets(
        boxes,
        np.array(f[features.OBJECT_CLASS].int64_list.value),
        padded,
        np.array(f[features.OBJECT_IS_CROWD].int64_list.value),
        grids=spec.grids,
        scale_ranges=spec.scale_ranges,
        sigma=spec.sigma,
    )
    np.testing.assert_array_equal(
        _tensor(with_targets, features.SOLO_CELL_CLASS, 0, tf.int32), expected["cell_class"]
    )
    np.testing.assert_array_equal(
        _tensor(with_targets, features.SOLO_INSTANCE_MASKS, 0, tf.uint8), expected["instance_masks"]
    )


def test_flipped_variant_mirrors_masks(demo_examples):
    """With a resized width divisible by 4, the 1/4-scale flipped masks mirror exactly."""
    maker = TargetMaker(
        TargetSpec(
            (40, 36, 24, 16, 12),
            ((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)),
            0.2,
            352,
            ((256, False), (256, True)),
        )
    )
    checked = 0
    for example in read_examples(demo_examples.uri, "train"):
        with_targets, _ = maker.add_targets(example)
        f = with_targets.features.feature
        new_w = f[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value[0]
        if new_w % 4:
            continue
        plain = _tensor(with_targets, features.SOLO_INSTANCE_MASKS, 0, tf.uint8)[:, :, : new_w // 4]
        flipped = _tensor(with_targets, features.SOLO_INSTANCE_MASKS, 1, tf.uint8)[
            :, :, : new_w // 4
        ]
        np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
        # Positive cells are the same number of instances, mirrored geometry.
        cls0 = _tensor(with_targets, features.SOLO_CELL_CLASS, 0, tf.int32)
        cls1 = _tensor(with_targets, features.SOLO_CELL_CLASS, 1, tf.int32)
        assert sorted(set(cls0.tolist())) == sorted(set(cls1.tolist()))
        checked += 1
    assert checked >= 1


def test_tiny_instance_that_vanishes_is_counted_not_dropped():
    """An object 1 px wide in a 4000-px-wide image is empty after resize; it stays, counted."""
    height, width = 40, 4000
    mask_small = np.zeros((height, width), np.uint8)
    mask_small[10:20, 1001] = 1
    mask_big = np.zeros((height, width), np.uint8)
    mask_big[5:35, 100:3000] = 1
    example = tf.train.Example()
    f = example.features.feature
    f[features.IMAGE_HEIGHT].int64_list.value.append(height)
    f[features.IMAGE_WIDTH].int64_list.value.append(width)
    for mask, box in ((mask_small, (1001, 10, 1002, 20)), (mask_big, (100, 5, 3000, 35))):
        rle = mask_utils.encode(np.asfortranarray(mask))
        f[features.OBJECT_MASK_RLE].bytes_list.value.append(rle["counts"])
        for key, value in zip(features.OBJECT_BOX_KEYS, box):
            f[key].float_list.value.append(value)
        f[features.OBJECT_CLASS].int64_list.value.append(0)
        f[features.OBJECT_IS_CROWD].int64_list.value.append(0)
    maker = TargetMaker(target_spec_for("demo_cpu", "eval"))
    with_targets, counts = maker.add_targets(example)
    assert counts["instances"] == 2
    assert counts["empty_after_resize"] == 1
    assert counts["positive_instances"] == 1
    masks = _tensor(with_targets, features.SOLO_INSTANCE_MASKS, 0, tf.uint8)
    assert masks.shape[0] == 2 and masks[0].sum() == 0  # Kept, empty.


def test_training_decoder_draws_every_variant_and_matches_geometry(target_artifact):
    files = glob.glob(os.path.join(target_artifact.uri, "Split-train", "*.gz"))
    record = next(iter(tf.data.TFRecordDataset(files, compression_type="GZIP")))
    seen = set()
    for seed in range(12):
        decoded = decode_training_example(
            record, max_size=352, num_cells=3872, random_variant=True, seed=seed
        )
        # The flipped image is the mirror of the plain one inside the resized region.
        seen.add(decoded["images"].numpy().tobytes())
        assert decoded["images"].shape == (352, 352, 3)
    assert len(seen) == 2  # Both variants are drawn.
    plain = decode_training_example(record, max_size=352, num_cells=3872, random_variant=False)
    example = tf.train.Example.FromString(record.numpy())
    new_w = example.features.feature[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value[0]
    new_h = example.features.feature[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value[0]
    image = plain["images"].numpy()
    assert np.abs(image[:new_h, :new_w]).sum() > 0
    np.testing.assert_array_equal(image[new_h:], 0)
    np.testing.assert_array_equal(image[:, new_w:], 0)
    np.testing.assert_array_equal(
        plain["cell_class"], _tensor(example, features.SOLO_CELL_CLASS, 0, tf.int32)
    )
