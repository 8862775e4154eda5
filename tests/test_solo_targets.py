"""SoloTargetGen: variants, geometry agreement with the training decoder, degenerate counts, and
its targets from RLE runs (no decoded masks) pinned to the direct computation."""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import itertools
import json
import os
import pathlib

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils
from tfx.types import standard_artifacts

from components.coco_example_gen.example_builder import segmentation_to_rle
from components.solo_targets.component import BATCH_SIZE, SoloTargetGen, target_spec_for
from components.solo_targets.transform import (
    COUNT_NAMES,
    TargetMaker,
    TargetSpec,
    _serialize_tensor,
    decode_rle_masks,
    decode_training_example,
    nearest_source_indices,
    rle_runs,
)
from models import preprocess
from models.config import apply_overrides, get_experiment
from models.targets import compute_targets, unpack_masks
from pipeline.demo_data import generate_demo_dataset
from schemas import features
from tests.example_gen_utils import read_examples, run_example_gen

DEMO_SPLITS = {
    "train": "annotations/instances_train.json",
    "eval": "annotations/instances_val.json",
}
COCO_TINY = pathlib.Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"


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


def _masks(example, k):
    """Variant k's `[N, Ph/4, Pw/4]` masks (the recorded pad), from their stored packed form
    (whose shape is checked: the resized image's rows and columns at 1/4 scale, 8 columns per
    byte)."""
    f = example.features.feature
    packed = _tensor(example, features.SOLO_INSTANCE_MASKS, k, tf.uint8)
    new_h = f[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value[k]
    new_w = f[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value[k]
    n = len(f[features.OBJECT_CLASS].int64_list.value)
    assert packed.shape == (n, -(-new_h // 4), -(-new_w // 32))
    pad_height, pad_width = f[features.SOLO_PADDED_SIZE].int64_list.value
    return unpack_masks(packed, pad_height // 4, pad_width // 4).numpy()


def _variants(example) -> list[tuple[int, int]]:
    """(short side, flip) of each stored target variant."""
    f = example.features.feature
    return list(
        zip(
            f[features.SOLO_VARIANT_SHORT_SIDE].int64_list.value,
            f[features.SOLO_VARIANT_FLIP].int64_list.value,
        )
    )


def test_component_writes_every_split_with_its_variants(demo_examples, target_artifact):
    assert json.loads(target_artifact.split_names) == ["train", "eval"]
    # demo_cpu trains at 224, 240 and 256, each unflipped and flipped; eval at 256.
    train_variants = [(side, flip) for side in (224, 240, 256) for flip in (0, 1)]
    for split, expected_variants in (("train", train_variants), ("eval", [(256, 0)])):
        originals = read_examples(demo_examples.uri, split)
        written = read_examples(target_artifact.uri, split)
        assert len(written) == len(originals)
        pads = collections.Counter()
        for example in written:
            assert _variants(example) == expected_variants
            f = example.features.feature
            # Training targets at the image's orientation pad, eval ones at the square.
            pad = tuple(f[features.SOLO_PADDED_SIZE].int64_list.value)
            landscape = (
                f[features.IMAGE_WIDTH].int64_list.value[0]
                >= f[features.IMAGE_HEIGHT].int64_list.value[0]
            )
            if split == "eval":
                assert pad == (352, 352)
            else:
                assert pad == ((256, 352) if landscape else (352, 256))
            pads[pad] += 1
            # The original features are kept unchanged.
            assert f[features.IMAGE_ENCODED].bytes_list.value
            n = len(f[features.OBJECT_CLASS].int64_list.value)
            assert _masks(example, 0).shape == (n, pad[0] // 4, pad[1] // 4)
        assert len(pads) == (1 if split == "eval" else 2), pads
    assert os.path.exists(os.path.join(target_artifact.uri, features.CATEGORY_MAP_FILENAME))


def test_component_output_and_report_equal_the_single_image_path(demo_examples, target_artifact):
    """The Beam component (batched) writes, per image, what `add_targets` gives that image alone,
    and its report sums the per-image degenerate counts of the single-image path."""
    with open(os.path.join(target_artifact.uri, features.SOLO_TARGETS_REPORT_FILENAME)) as f:
        report = json.load(f)
    for split in ("train", "eval"):
        maker = TargetMaker(target_spec_for("demo_cpu", split))
        expected, totals = {}, collections.Counter()
        for example in read_examples(demo_examples.uri, split):
            with_targets, counts = maker.add_targets(example)
            expected[example.features.feature[features.IMAGE_ID].int64_list.value[0]] = with_targets
            totals.update(counts)
        written = read_examples(target_artifact.uri, split)
        assert len(written) == len(expected)
        for example in written:
            assert (
                example == expected[example.features.feature[features.IMAGE_ID].int64_list.value[0]]
            )
        assert {key: report["splits"][split][key] for key in COUNT_NAMES} == {
            key: totals[key] for key in COUNT_NAMES
        }


def _targets_with_overrides(examples, uri: str, overrides: dict):
    """SoloTargetGen on `examples` under demo_cpu with `target_overrides`; the output artifact."""
    out = standard_artifacts.Examples()
    out.uri = uri
    SoloTargetGen.test_call(
        examples=examples,
        targets=out,
        experiment="demo_cpu",
        target_overrides=json.dumps(overrides),
        beam_pipeline=beam.Pipeline(),
    )
    return out


def test_target_overrides_change_the_variants_and_are_recorded(demo_examples, tmp_path):
    """A geometry override reaches the targets (and the report records the spec the Trainer
    checks); without it the Trainer would get targets for the named config's geometry."""
    overrides = {"train": {"train_short_sides": [224, 256], "flip_prob": 0.0}}
    out = _targets_with_overrides(demo_examples, str(tmp_path), overrides)
    config = apply_overrides(get_experiment("demo_cpu"), overrides)
    with open(os.path.join(out.uri, features.SOLO_TARGETS_REPORT_FILENAME)) as f:
        report = json.load(f)
    assert report["target_overrides"] == overrides
    for split, expected_variants in (("train", [(224, 0), (256, 0)]), ("eval", [(256, 0)])):
        assert report["splits"][split]["spec"] == TargetSpec.from_config(config, split).to_json()
        assert all(_variants(e) == expected_variants for e in read_examples(out.uri, split))


@pytest.mark.parametrize(
    "overrides", [{"train": {"base_lr": 0.1}}, {"model": {"fpn_channels": 32}}, {"eval": {}}]
)
def test_target_overrides_refuse_settings_that_do_not_shape_targets(
    demo_examples, tmp_path, overrides
):
    with pytest.raises(ValueError, match="target_overrides may only set"):
        _targets_with_overrides(demo_examples, str(tmp_path), overrides)


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


def _first_of_each_orientation(examples) -> list:
    """The first landscape and the first portrait example."""
    chosen = {}
    for example in examples:
        f = example.features.feature
        portrait = (
            f[features.IMAGE_HEIGHT].int64_list.value[0]
            > (f[features.IMAGE_WIDTH].int64_list.value[0])
        )
        chosen.setdefault(portrait, example)
    assert len(chosen) == 2, "the demo split should hold both orientations"
    return [chosen[False], chosen[True]]


@pytest.mark.parametrize("orientation_pad", [True, False])
def test_targets_equal_direct_computation_at_the_same_geometry(demo_examples, orientation_pad):
    """Variant 0 of an example = compute_targets on masks resized and padded by preprocess, at
    the square pad or (orientation_pad) the example's orientation rectangle: 256 x 352 for a
    landscape demo image, 352 x 256 for a portrait one."""
    spec = dataclasses.replace(
        target_spec_for("demo_cpu", "train"), orientation_pad=orientation_pad
    )
    maker = TargetMaker(spec)
    for example in _first_of_each_orientation(read_examples(demo_examples.uri, "train")):
        _check_direct_computation(spec, maker, example, orientation_pad)


def _check_direct_computation(spec, maker, example, orientation_pad):
    with_targets, _ = maker.add_targets(example)
    masks = decode_rle_masks(example)
    f = example.features.feature
    height, width = masks.shape[1:]
    pad_shape = ((256, 352) if width >= height else (352, 256)) if orientation_pad else (352, 352)
    assert list(with_targets.features.feature[features.SOLO_PADDED_SIZE].int64_list.value) == [
        *pad_shape
    ]
    short_side = spec.variants[0][0]  # variant 0: unflipped, the first training scale
    new_h, new_w = (int(v) for v in preprocess.resized_shape(height, width, short_side, 352))
    resized = tf.image.resize(masks[..., None], [new_h, new_w], method="nearest")[..., 0]
    padded = np.zeros((len(masks), *pad_shape), np.uint8)
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
    np.testing.assert_array_equal(_masks(with_targets, 0), expected["instance_masks"])


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
        plain = _masks(with_targets, 0)[:, :, : new_w // 4]
        flipped = _masks(with_targets, 1)[:, :, : new_w // 4]
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
    masks = _masks(with_targets, 0)
    assert masks.shape[0] == 2 and masks[0].sum() == 0  # Kept, empty.


def test_training_decoder_draws_every_variant_and_matches_geometry(target_artifact):
    files = glob.glob(os.path.join(target_artifact.uri, "Split-train", "*.gz"))
    record = next(iter(tf.data.TFRecordDataset(files, compression_type="GZIP")))
    example = tf.train.Example.FromString(record.numpy())
    pad_height, pad_width = example.features.feature[features.SOLO_PADDED_SIZE].int64_list.value
    assert sorted([pad_height, pad_width]) == [256, 352]  # demo_cpu: the orientation pad
    decode = functools.partial(
        decode_training_example, max_size=352, num_cells=3872, orientation_pad=True
    )
    num_variants = len(_variants(example))  # demo_cpu: 3 scales x {plain, flipped}
    seen = set()
    for seed in range(8 * num_variants):
        decoded = decode(record, random_variant=True, seed=seed)
        # The flipped image is the mirror of the plain one inside the resized region.
        seen.add(decoded["images"].numpy().tobytes())
        assert decoded["images"].shape == (pad_height, pad_width, 3)
        assert decoded["instance_masks"].shape[1:] == (pad_height // 4, pad_width // 4)
    assert num_variants == 6
    assert len(seen) == num_variants  # Every variant is drawn.
    plain = decode(record, random_variant=False)
    # Decoding them as square-pad targets is refused: they would train the wrong cells.
    with pytest.raises(tf.errors.InvalidArgumentError, match="another pad"):
        decode_training_example(record, max_size=352, num_cells=3872, random_variant=False)
    new_w = example.features.feature[features.SOLO_VARIANT_RESIZED_WIDTH].int64_list.value[0]
    new_h = example.features.feature[features.SOLO_VARIANT_RESIZED_HEIGHT].int64_list.value[0]
    image = plain["images"].numpy()
    assert np.abs(image[:new_h, :new_w]).sum() > 0
    np.testing.assert_array_equal(image[new_h:], 0)
    np.testing.assert_array_equal(image[:, new_w:], 0)
    np.testing.assert_array_equal(
        plain["cell_class"], _tensor(example, features.SOLO_CELL_CLASS, 0, tf.int32)
    )


# --------------------------------------------------------------------------------------------
# TargetMaker computes targets from the RLE runs; these pin it to the direct computation.


def _runs_from_masks(masks: np.ndarray) -> list[list[int]]:
    """Run lengths of `[N, H, W]` masks in column-major order, background first (NumPy)."""
    runs = []
    for mask in masks:
        flat = mask.T.reshape(-1)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
        runs.append(([0] if flat[0] else []) + np.diff(bounds).tolist())
    return runs


def _ragged_list(values: np.ndarray, splits: np.ndarray) -> list[list[int]]:
    return [values[start:end].tolist() for start, end in zip(splits[:-1], splits[1:])]


def test_rle_runs_match_pycocotools():
    """Every kind of run: long ones (many 5-bit groups), zero-length first run, deltas of both
    signs, one-pixel runs, empty and full masks, sizes up to 2000 x 3000."""
    rng = np.random.default_rng(0)
    masks = []
    for height, width in [(1, 1), (7, 5), (64, 48), (480, 640), (2000, 3000)]:
        batch = np.zeros((6, height, width), np.uint8)
        batch[1] = 1
        batch[2] = rng.random((height, width)) < (0.5 if height * width < 10**6 else 0.001)
        batch[3, height // 3 :, width // 4 :] = 1
        batch[4, 0, 0] = 1
        batch[5] = np.add.outer(np.arange(height) // 7, np.arange(width) // 3) % 2
        masks.append(batch)
    for batch in masks:
        encoded = mask_utils.encode(np.asfortranarray(np.moveaxis(batch, 0, -1)))
        runs = _ragged_list(*rle_runs([e["counts"] for e in encoded]))
        assert runs == _runs_from_masks(batch)
    # Values of up to 7 groups, whose differences two values apart have both signs.
    runs = [[0, 1, 2**30 + 7, 5, 2**20, 3, 1], [7], [2, 0, 3, 0, 1]]
    counts = [
        mask_utils.frPyObjects({"size": [1, sum(r)], "counts": r}, 1, sum(r))["counts"]
        for r in runs
    ]
    assert _ragged_list(*rle_runs(counts)) == runs
    assert _ragged_list(*rle_runs([])) == []
    with pytest.raises(ValueError, match="ends inside a value"):
        rle_runs([b"3", b"1P"])  # "P" = 32 + 0: a group with more to follow


@pytest.mark.skipif(
    not (COCO_TINY / "annotations").is_dir(), reason=f"coco_tiny data not found at {COCO_TINY}"
)
def test_rle_runs_decode_every_coco_tiny_mask():
    """Polygons, multi-polygons and crowd RLE, as CocoExampleGen encodes them."""
    checked = 0
    for example in _coco_tiny_examples():
        f = example.features.feature
        runs = _ragged_list(*rle_runs(f[features.OBJECT_MASK_RLE].bytes_list.value))
        assert runs == _runs_from_masks(decode_rle_masks(example))
        checked += len(runs)
    assert checked > 1000


def test_nearest_source_indices_are_the_resize():
    """`resize_masks` = selecting the mapped rows and columns, for up- and downscales."""
    rng = np.random.default_rng(1)
    sizes = [(1, 1, 3, 2), (5, 7, 5, 7), (480, 640, 800, 1067), (333, 500, 96, 144)]
    sizes += [tuple(rng.integers(1, 400, 4)) for _ in range(40)]
    for height, width, new_height, new_width in sizes:
        masks = (rng.random((2, height, width)) < 0.5).astype(np.uint8)
        masks[1] = (
            np.arange(height * width).reshape(height, width) % 251
        )  # values tell pixels apart
        rows, cols = nearest_source_indices(height, width, new_height, new_width)
        resized = preprocess.resize_masks(masks, new_height, new_width).numpy()
        np.testing.assert_array_equal(resized, masks[:, rows][:, :, cols])
    big_rows, _ = nearest_source_indices(70000, 3, 800, 3)  # row indices need a third digit
    assert big_rows.max() > 65536


def test_centre_on_a_cell_boundary_under_the_fixed_pad():
    """The pad is a constant of TargetMaker's graph; the centre cell must still be the official
    `(280 / 1344) // (1 / 24) == 5` (see `test_exact_division_when_the_pad_is_a_graph_constant`)."""
    size = 1344
    mask = np.zeros((size, size), np.uint8)
    mask[180:381, 600:801] = 1  # centre of mass exactly (280, 700)
    example = tf.train.Example()
    f = example.features.feature
    f[features.IMAGE_HEIGHT].int64_list.value.append(size)
    f[features.IMAGE_WIDTH].int64_list.value.append(size)
    f[features.OBJECT_MASK_RLE].bytes_list.value.append(
        mask_utils.encode(np.asfortranarray(mask))["counts"]
    )
    for key, value in zip(features.OBJECT_BOX_KEYS, (600, 0, 800, 600)):  # 600 px high box
        f[key].float_list.value.append(value)
    f[features.OBJECT_CLASS].int64_list.value.append(3)
    f[features.OBJECT_IS_CROWD].int64_list.value.append(0)
    spec = target_spec_for("solov2_r50_fpn_1x", "eval")
    spec = TargetSpec(spec.grids, spec.scale_ranges, spec.sigma, size, ((size, False),))
    with_targets, _ = TargetMaker(spec).add_targets(example)
    expected = compute_targets([[0, 600, 600, 800]], [3], mask[np.newaxis], [False])  # eager
    cell_instance = _tensor(with_targets, features.SOLO_CELL_INSTANCE, 0, tf.int32)
    np.testing.assert_array_equal(cell_instance, expected["cell_instance"])
    level2 = cell_instance[2896:3472].reshape(24, 24)
    assert np.flatnonzero((level2 >= 0).any(axis=1)).tolist() == [4, 5, 6]


def _coco_tiny_examples(with_images: bool = False):
    """Every coco_tiny image with the features TargetMaker reads, masks encoded by CocoExampleGen
    (`with_images`: also the JPEG and the image id, for the training decoder)."""
    from pycocotools.coco import COCO

    for split in ("train2017", "val2017"):
        coco = COCO(str(COCO_TINY / f"annotations/instances_{split}.json"))
        class_index = {cat: i for i, cat in enumerate(sorted(coco.getCatIds()))}
        for img_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(img_id)[0]
            height, width = info["height"], info["width"]
            example = tf.train.Example()
            f = example.features.feature
            f[features.IMAGE_HEIGHT].int64_list.value.append(height)
            f[features.IMAGE_WIDTH].int64_list.value.append(width)
            if with_images:
                jpeg = (COCO_TINY / split / info["file_name"]).read_bytes()
                f[features.IMAGE_ENCODED].bytes_list.value.append(jpeg)
                f[features.IMAGE_ID].int64_list.value.append(img_id)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
                rle = segmentation_to_rle(ann["segmentation"], height, width)
                f[features.OBJECT_MASK_RLE].bytes_list.value.append(rle)
                x, y, w, h = ann["bbox"]
                for key, value in zip(features.OBJECT_BOX_KEYS, (x, y, x + w, y + h)):
                    f[key].float_list.value.append(value)
                f[features.OBJECT_CLASS].int64_list.value.append(class_index[ann["category_id"]])
                f[features.OBJECT_IS_CROWD].int64_list.value.append(ann["iscrowd"])
            yield example


def _dense_variant_fn(spec: TargetSpec):
    """One variant the direct way: decoded masks resized by `preprocess.resize_masks`, mirrored,
    padded, then `compute_targets` (TargetMaker's computation before the runs path)."""

    def variant(masks, boxes_xyxy, classes, is_crowd, short_side, flip):
        height, width = tf.shape(masks)[1], tf.shape(masks)[2]
        new_h, new_w = preprocess.resized_shape(height, width, short_side, spec.max_size)
        resized = preprocess.resize_masks(masks, new_h, new_w)
        scale_x = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
        scale_y = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
        xmin, ymin = boxes_xyxy[:, 0] * scale_x, boxes_xyxy[:, 1] * scale_y
        xmax, ymax = boxes_xyxy[:, 2] * scale_x, boxes_xyxy[:, 3] * scale_y
        new_w_f = tf.cast(new_w, tf.float32)
        xmin, xmax = tf.where(flip, new_w_f - xmax, xmin), tf.where(flip, new_w_f - xmin, xmax)
        resized = tf.cond(flip, lambda: tf.reverse(resized, axis=[2]), lambda: resized)
        targets = compute_targets(
            tf.stack([ymin, xmin, ymax, xmax], axis=1),
            classes,
            preprocess.pad_to(resized, *spec.pad_shape(height, width)),
            is_crowd,
            grids=spec.grids,
            scale_ranges=spec.scale_ranges,
            sigma=spec.sigma,
        )
        empty_after_resize = tf.reduce_sum(tf.cast(resized, tf.int32), axis=[1, 2]) == 0
        return targets, empty_after_resize

    return tf.function(
        variant,
        input_signature=[
            tf.TensorSpec([None, None, None], tf.uint8),
            tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.bool),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.bool),
        ],
    )


@pytest.mark.skipif(
    not (COCO_TINY / "annotations").is_dir(), reason=f"coco_tiny data not found at {COCO_TINY}"
)
def test_targets_equal_the_direct_computation_on_every_coco_tiny_image():
    """All 160 images, official 800 / 1333 geometry (1344 pad), with and without flip, in
    batches as SoloTargetGen runs them: the serialized targets and the degenerate counts are
    those of the direct computation."""
    official = target_spec_for("solov2_r50_fpn_1x", "train")
    spec = TargetSpec(official.grids, official.scale_ranges, official.sigma, 1333, ())
    maker, dense_fn = TargetMaker(spec), _dense_variant_fn(spec)

    def variants_of(image):  # the flips alternate from batch to batch
        batch = image // BATCH_SIZE
        return ((800, batch % 2 == 0), (640, batch % 2 == 1))

    examples, results = list(_coco_tiny_examples()), []
    for start in range(0, len(examples), BATCH_SIZE):
        batch = [example.SerializeToString() for example in examples[start : start + BATCH_SIZE]]
        results += maker.add_targets_to_records(batch, variants_of(start))
    totals = collections.Counter()
    for image, (example, (record, counts)) in enumerate(zip(examples, results, strict=True)):
        variants = variants_of(image)
        with_targets = tf.train.Example.FromString(record)
        f = example.features.feature
        masks = decode_rle_masks(example)
        boxes = np.stack([f[k].float_list.value for k in features.OBJECT_BOX_KEYS], 1)
        classes = np.asarray(f[features.OBJECT_CLASS].int64_list.value, np.int32)
        is_crowd = np.asarray(f[features.OBJECT_IS_CROWD].int64_list.value) == 1
        for k, (short_side, flip) in enumerate(variants):
            expected, empty_after = dense_fn(
                masks, boxes.astype(np.float32).reshape(-1, 4), classes, is_crowd, short_side, flip
            )
            for name, actual in (
                ("cell_class", _tensor(with_targets, features.SOLO_CELL_CLASS, k, tf.int32)),
                ("cell_instance", _tensor(with_targets, features.SOLO_CELL_INSTANCE, k, tf.int32)),
                ("instance_masks", _masks(with_targets, k)),
            ):
                np.testing.assert_array_equal(
                    actual, expected[name], err_msg=f"image {image}, variant {k}: {name}"
                )
            if k == 0:
                empty = masks.reshape(len(masks), -1).sum(axis=1) == 0
                num_cells = expected["instance_num_cells"].numpy()
                empty_after = empty_after.numpy()
                assert counts["empty_mask"] == (empty & ~is_crowd).sum()
                assert counts["empty_after_resize"] == (empty_after & ~empty & ~is_crowd).sum()
                assert (
                    counts["no_positive_cells"]
                    == ((num_cells == 0) & ~empty_after & ~is_crowd).sum()
                )
                assert counts["positive_instances"] == (num_cells > 0).sum()
        totals.update(counts)
    assert totals["crowd"] > 0 and totals["positive_instances"] > 1000


def test_serialize_tensor_is_tf_serialize_tensor():
    """The stored targets are `tf.io.serialize_tensor` values, bit for bit (`docs/CONTRACT.md`)."""
    rng = np.random.default_rng(3)
    for array in (
        np.arange(3872, dtype=np.int32) - 1,
        np.zeros(0, np.int32),
        rng.integers(0, 256, (5, 7, 3)).astype(np.uint8),
        np.zeros((0, 200, 42), np.uint8),
        np.zeros((3, 0, 5), np.uint8),
        rng.integers(0, 256, (4, 9, 6)).astype(np.uint8)[:, ::2, 1:4],  # not contiguous
        rng.integers(0, 256, (20, 200, 42)).astype(np.uint8),  # a 3-byte length
        np.ones((3, 1000, 1000), np.uint8),  # a 4-byte length
    ):
        assert _serialize_tensor(array) == tf.io.serialize_tensor(array).numpy()


def _example_without_instances(height: int, width: int) -> tf.train.Example:
    """An image without annotations: no object feature at all."""
    example = tf.train.Example()
    f = example.features.feature
    f[features.IMAGE_HEIGHT].int64_list.value.append(height)
    f[features.IMAGE_WIDTH].int64_list.value.append(width)
    f[features.IMAGE_ID].int64_list.value.append(2)
    return example


@pytest.mark.skipif(
    not (COCO_TINY / "annotations").is_dir(), reason=f"coco_tiny data not found at {COCO_TINY}"
)
def test_batched_targets_equal_single_image_targets():
    """`add_targets_to_records` on a batch of images of different sizes (COCO images, random
    masks of odd sizes, an image without instances, one with crowd instances only) returns, for
    each image, the bytes and the degenerate counts of `add_targets_to_record` on it alone,
    whatever its place in the batch."""
    rng = np.random.default_rng(11)
    crowd_only = _random_example(rng, 240, 180, 4)
    crowd_only.features.feature[features.OBJECT_IS_CROWD].int64_list.value[:] = [1] * 4
    examples = [e for e, _ in zip(_coco_tiny_examples(), range(5))]
    examples[2:2] = [_example_without_instances(333, 500), crowd_only]
    examples += [_random_example(rng, h, w, n) for h, w, n in ((37, 53, 6), (300, 41, 4))]
    assert (
        len(
            {
                tuple(e.features.feature[features.IMAGE_HEIGHT].int64_list.value)
                + tuple(e.features.feature[features.IMAGE_WIDTH].int64_list.value)
                for e in examples
            }
        )
        >= 6
    )
    records = [example.SerializeToString() for example in examples]
    for spec, variants in (
        (target_spec_for("solov2_r50_fpn_1x", "train"), ((800, False), (640, True))),
        (target_spec_for("demo_cpu", "eval"), None),
    ):
        maker = TargetMaker(spec)
        alone = [maker.add_targets_to_record(record, variants) for record in records]
        assert maker.add_targets_to_records(records, variants) == alone
        assert maker.add_targets_to_records(records[::-1], variants) == alone[::-1]
        empty, crowd = alone[2][1], alone[3][1]
        assert empty == collections.Counter(dict.fromkeys(COUNT_NAMES, 0))
        assert crowd["instances"] == crowd["crowd"] == 4 and crowd["positive_instances"] == 0
        with_targets = tf.train.Example.FromString(alone[2][0])
        pad_height, pad_width = spec.pad_shape(333, 500)  # (800, 1344) for the training spec
        assert _masks(with_targets, 0).shape == (0, pad_height // 4, pad_width // 4)
        np.testing.assert_array_equal(
            _tensor(with_targets, features.SOLO_CELL_CLASS, 0, tf.int32), -1
        )
        assert sum(counts["positive_instances"] for _, counts in alone) > 10


def test_variants_of_an_image_equal_each_variant_alone():
    """K variants in one call (they share the example's parsing and rectangles) give each
    variant the bytes it gets alone: images of different sizes, up- and downscaled, one
    without instances, one with crowd instances only, one a single row high."""
    rng = np.random.default_rng(12)
    crowd_only = _random_example(rng, 240, 180, 4)
    crowd_only.features.feature[features.OBJECT_IS_CROWD].int64_list.value[:] = [1] * 4
    examples = [_random_example(rng, h, w, n) for h, w, n in ((37, 53, 6), (300, 41, 4))]
    examples += [_example_without_instances(333, 500), crowd_only]
    examples += [_random_example(rng, h, w, n) for h, w, n in ((97, 131, 9), (1, 500, 3))]
    records = [example.SerializeToString() for example in examples]
    variants = ((256, False), (256, True), (224, False), (288, True))
    # A multi-scale recipe: the orientation pad holds the largest short side (288 x 352).
    maker = TargetMaker(
        dataclasses.replace(target_spec_for("demo_cpu", "train"), variants=variants)
    )
    together = maker.add_targets_to_records(records, variants)
    alone = [maker.add_targets_to_records(records, (variant,)) for variant in variants]
    keys = (
        features.SOLO_VARIANT_SHORT_SIDE,
        features.SOLO_VARIANT_FLIP,
        features.SOLO_VARIANT_RESIZED_HEIGHT,
        features.SOLO_VARIANT_RESIZED_WIDTH,
        features.SOLO_CELL_CLASS,
        features.SOLO_CELL_INSTANCE,
        features.SOLO_INSTANCE_MASKS,
    )
    positives = 0
    for i, (record, counts) in enumerate(together):
        assert counts == alone[0][i][1]  # the counts are the first variant's
        f = tf.train.Example.FromString(record).features.feature
        for k in range(len(variants)):
            variant = tf.train.Example.FromString(alone[k][i][0])
            for key in keys:
                (values,) = f[key].ListFields()  # (descriptor, its values): one list per feature
                (value,) = variant.features.feature[key].ListFields()
                assert len(values[1].value) == len(variants) and len(value[1].value) == 1, key
                assert values[1].value[k] == value[1].value[0], (i, k, key)
            cell_instance = _tensor(variant, features.SOLO_CELL_INSTANCE, 0, tf.int32)
            positives += int((cell_instance >= 0).sum())
    assert positives > 0


def _random_example(rng: np.random.Generator, height: int, width: int, n: int):
    """Blobs, noise, full and empty masks on a black JPEG of `height` x `width`."""
    masks = np.zeros((n, height, width), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        masks[i, y0 : y0 + rng.integers(1, height + 1), x0 : x0 + rng.integers(1, width + 1)] = 1
    masks[0] = 1
    masks[1] = rng.random((height, width)) < 0.3
    masks[2] = 0
    example = tf.train.Example()
    f = example.features.feature
    jpeg = tf.io.encode_jpeg(tf.zeros([height, width, 3], tf.uint8)).numpy()
    f[features.IMAGE_ENCODED].bytes_list.value.append(jpeg)
    f[features.IMAGE_ID].int64_list.value.append(1)
    f[features.IMAGE_HEIGHT].int64_list.value.append(height)
    f[features.IMAGE_WIDTH].int64_list.value.append(width)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if rows.size else (0, 0, 0, 0)
        f[features.OBJECT_MASK_RLE].bytes_list.value.append(
            mask_utils.encode(np.asfortranarray(mask))["counts"]
        )
        for key, value in zip(features.OBJECT_BOX_KEYS, box):
            f[key].float_list.value.append(value)
        f[features.OBJECT_CLASS].int64_list.value.append(i % 5)
        f[features.OBJECT_IS_CROWD].int64_list.value.append(0)
    return example


@pytest.mark.skipif(
    not (COCO_TINY / "annotations").is_dir(), reason=f"coco_tiny data not found at {COCO_TINY}"
)
def test_training_decoder_returns_the_dense_masks():
    """`decode_training_example` unpacks the stored (packed, cropped) masks to exactly the
    `[N, P/4, P/4]` uint8 masks of `compute_targets` on the resized, flipped, padded masks (the
    tensor the examples stored before the packed format): coco_tiny images at the official
    size (1344 pad), and random masks of odd sizes, upscaled and downscaled, at the demo size."""
    official = target_spec_for("solov2_r50_fpn_1x", "train")
    demo = target_spec_for("demo_cpu", "train")
    rng = np.random.default_rng(7)
    cases = [(official, e) for e, _ in zip(_coco_tiny_examples(with_images=True), range(10))]
    for height, width, n in [(37, 53, 6), (300, 41, 4), (97, 131, 9), (352, 352, 3), (1, 500, 3)]:
        cases.append((demo, _random_example(rng, height, width, n)))
    makers = {spec: (TargetMaker(spec), _dense_variant_fn(spec)) for spec in (official, demo)}
    nonempty = 0
    for i, (spec, example) in enumerate(cases):
        flip = i % 2 == 1
        short_side = spec.variants[0][0]
        maker, dense_fn = makers[spec]
        with_targets, _ = maker.add_targets(example, ((short_side, flip),))
        decoded = decode_training_example(
            with_targets.SerializeToString(),
            max_size=spec.max_size,
            num_cells=3872,
            random_variant=False,
            orientation_pad=spec.orientation_pad,
        )
        f = example.features.feature
        boxes = np.stack([f[k].float_list.value for k in features.OBJECT_BOX_KEYS], 1)
        expected, _ = dense_fn(
            decode_rle_masks(example),
            boxes.astype(np.float32).reshape(-1, 4),
            np.asarray(f[features.OBJECT_CLASS].int64_list.value, np.int32),
            np.asarray(f[features.OBJECT_IS_CROWD].int64_list.value) == 1,
            short_side,
            flip,
        )
        for name in ("instance_masks", "cell_class", "cell_instance"):
            assert decoded[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(decoded[name], expected[name], err_msg=f"case {i}")
        nonempty += int(expected["instance_masks"].numpy().any())
    assert nonempty == len(cases) - 1  # The one-row image is empty at 1/4 scale.


def test_orientation_pad_holds_every_variant_and_is_no_larger_than_needed():
    """`orientation_pad_shape`: every scale variant of an image fits its pad, the pad is the
    smallest multiple of 32 that holds the largest variant, and the tensor form agrees."""
    short_sides, max_size = (640, 672, 704, 736, 768, 800), 1333
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (640, 480), (500, 500), (100, 2000), (2000, 100), (427, 640)]
    sizes += [tuple(int(v) for v in rng.integers(50, 3000, 2)) for _ in range(40)]
    for height, width in sizes:
        pad_h, pad_w = preprocess.orientation_pad_shape(height, width, max(short_sides), max_size)
        expected = (800, 1344) if width >= height else (1344, 800)
        assert (pad_h, pad_w) == expected
        resized = [preprocess.resized_shape(height, width, s, max_size) for s in short_sides]
        assert all(int(h) <= pad_h and int(w) <= pad_w for h, w in resized)
        tensor_pad = preprocess.orientation_pad_shape(
            tf.constant(height), tf.constant(width), max(short_sides), max_size
        )
        assert tuple(int(v) for v in tensor_pad) == (pad_h, pad_w)
    # The demo recipe: one short side, 256 / 352.
    assert preprocess.orientation_pad_shape(259, 320, 256, 352) == (256, 352)
    assert preprocess.orientation_pad_shape(320, 259, 256, 352) == (352, 256)
    # A short side above the max size is capped by it.
    assert preprocess.orientation_pad_shape(100, 200, 900, 352) == (352, 352)


def test_a_batch_of_both_orientations_gives_each_example_its_own_pad(demo_examples):
    """Under orientation_pad a batch of landscape and portrait images is split into one graph
    call per pad; each example's targets equal those made for it alone, in input order."""
    spec = target_spec_for("demo_cpu", "train")
    assert spec.orientation_pad
    maker = TargetMaker(spec)
    examples = read_examples(demo_examples.uri, "train")[:12]
    portrait = [
        e.features.feature[features.IMAGE_HEIGHT].int64_list.value[0]
        > e.features.feature[features.IMAGE_WIDTH].int64_list.value[0]
        for e in examples
    ]
    assert any(portrait) and not all(portrait)
    records = [e.SerializeToString() for e in examples]
    batched = maker.add_targets_to_records(records)
    for record, (with_targets, counts), is_portrait in zip(records, batched, portrait):
        alone, alone_counts = maker.add_targets_to_record(record)
        assert with_targets == alone and counts == alone_counts
        pad = (
            tf.train.Example.FromString(with_targets)
            .features.feature[features.SOLO_PADDED_SIZE]
            .int64_list.value
        )
        assert list(pad) == ([352, 256] if is_portrait else [256, 352])
    # A variant larger than the spec's short sides would not fit the orientation pad.
    with pytest.raises(ValueError, match="exceed the short sides"):
        maker.add_targets_to_records(records[:1], ((288, False),))


def test_training_batches_hold_one_orientation_each(target_artifact):
    """`make_dataset` under demo_cpu's orientation_pad: every batch is one pad shape (landscape
    256 x 352 or portrait 352 x 256), both come, and the masks match their images' pad."""
    from models.train import make_dataset

    config = get_experiment("demo_cpu")
    assert config.train.orientation_pad
    pattern = os.path.join(target_artifact.uri, "Split-train", "*")
    dataset = make_dataset(pattern, config, 2, seed=0, shuffle_buffer=8)
    assert dataset.element_spec["images"].shape.as_list() == [2, None, None, 3]
    shapes = collections.Counter()
    for batch in dataset.take(12):
        images = batch["images"].numpy()
        pad_height, pad_width = images.shape[1:3]
        assert (pad_height, pad_width) in ((256, 352), (352, 256))
        assert batch["instance_masks"].shape[2:] == (pad_height // 4, pad_width // 4)
        assert batch["cell_class"].shape == (2, config.model.num_cells)
        assert all(np.abs(image).sum() > 0 for image in images)
        shapes[(pad_height, pad_width)] += 1
    assert len(shapes) == 2, shapes


def test_one_trace_of_the_train_step_takes_both_orientations(target_artifact):
    """The trainer's step, traced once for the dataset's element spec (spatial dims None),
    trains on landscape and portrait batches alike."""
    from models.train import SOLOv2Trainer, make_dataset

    config = get_experiment("demo_cpu")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=2))
    trainer = SOLOv2Trainer(config, 10)
    pattern = os.path.join(target_artifact.uri, "Split-train", "*")
    dataset = trainer.distribute(
        lambda ctx, batch: make_dataset(
            pattern, config, batch, input_context=ctx, seed=0, shuffle_buffer=8
        )
    )
    shapes = set()
    for batch in itertools.islice(iter(dataset), 12):
        shape = tuple(batch["images"].shape[1:3])
        if shape in shapes:
            continue
        shapes.add(shape)
        metrics = trainer.train_step(batch)
        assert np.isfinite(float(metrics["total_loss"])) and float(metrics["total_loss"]) > 0
        if len(shapes) == 2:
            break
    assert shapes == {(256, 352), (352, 256)}
    assert trainer.traces == 1
