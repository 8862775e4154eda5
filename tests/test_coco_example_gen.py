"""CocoExampleGen: exact round trip on real COCO files, every bad-input case reported, and
output laid out as the stock ExampleGen writer lays it out."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import tracemalloc
import zlib

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.components.util import examples_utils
from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
from tfx.proto import example_gen_pb2
from tfx.types import standard_artifacts

from components.coco_example_gen.coco_reader import (
    CategoryMap,
    ImageTask,
    index_coco,
    read_coco_json,
    resolve_image_path,
    unpack_annotation,
)
from components.coco_example_gen.component import CocoExampleGen, executor_exec_properties
from components.coco_example_gen.executor import (
    MAX_TASKS_PER_FILE,
    MIN_TASK_FILES,
    CocoExecutor,
    TaskFileWriter,
    _ParseAndIndex,
    read_task_file,
    tasks_per_file,
)
from schemas import features
from tests.example_gen_utils import feature_values, read_examples, read_report, run_example_gen

# --------------------------------------------------------------------------------------------
# Real COCO: every mask, count, area, crowd flag and category id survives exactly.


@pytest.fixture(scope="module")
def coco_tiny_examples(coco_tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("coco_tiny_eg"))
    artifact = run_example_gen(
        coco_tiny_dir,
        out,
        split_files={
            "train": "annotations/instances_train2017.json",
            "eval": "annotations/instances_val2017.json",
        },
    )
    return coco_tiny_dir, artifact


@pytest.mark.parametrize("split,json_name", [("train", "train2017"), ("eval", "val2017")])
def test_coco_tiny_round_trip_is_exact(coco_tiny_examples, split, json_name):
    coco_dir, artifact = coco_tiny_examples
    coco = COCO(os.path.join(coco_dir, "annotations", f"instances_{json_name}.json"))
    examples = read_examples(artifact.uri, split)
    assert len(examples) == len(coco.getImgIds())
    with open(os.path.join(artifact.uri, features.CATEGORY_MAP_FILENAME)) as f:
        category_map = json.load(f)["categories"]
    coco_id_by_index = {c["index"]: c["coco_id"] for c in category_map}
    assert sorted(coco_id_by_index.values()) == sorted(coco.getCatIds())

    seen_annotations = 0
    for example in examples:
        image_id = feature_values(example, features.IMAGE_ID)[0]
        info = coco.imgs[image_id]
        height = feature_values(example, features.IMAGE_HEIGHT)[0]
        width = feature_values(example, features.IMAGE_WIDTH)[0]
        assert (height, width) == (info["height"], info["width"])
        assert feature_values(example, features.IMAGE_FILENAME)[0].decode() == info["file_name"]
        # RGB JPEGs are stored byte for byte.
        with open(os.path.join(coco_dir, json_name, info["file_name"]), "rb") as f:
            assert feature_values(example, features.IMAGE_ENCODED)[0] == f.read()

        anns = {a["id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))}
        ann_ids = feature_values(example, features.OBJECT_ANNOTATION_ID)
        assert sorted(ann_ids) == sorted(anns)
        rles = feature_values(example, features.OBJECT_MASK_RLE)
        classes = feature_values(example, features.OBJECT_CLASS)
        category_ids = feature_values(example, features.OBJECT_CATEGORY_ID)
        areas = feature_values(example, features.OBJECT_AREA)
        crowd = feature_values(example, features.OBJECT_IS_CROWD)
        xmin = feature_values(example, features.OBJECT_XMIN)
        ymax = feature_values(example, features.OBJECT_YMAX)
        for i, ann_id in enumerate(ann_ids):
            ann = anns[ann_id]
            decoded = mask_utils.decode({"size": [height, width], "counts": rles[i]})
            np.testing.assert_array_equal(decoded, coco.annToMask(ann))
            assert category_ids[i] == ann["category_id"]
            assert coco_id_by_index[classes[i]] == ann["category_id"]
            assert areas[i] == pytest.approx(ann["area"], rel=1e-6)  # float32 storage.
            assert crowd[i] == ann["iscrowd"]
            assert xmin[i] == pytest.approx(max(0.0, ann["bbox"][0]), abs=1e-3)
            assert ymax[i] == pytest.approx(min(height, ann["bbox"][1] + ann["bbox"][3]), abs=1e-3)
            seen_annotations += 1
    assert seen_annotations == len(coco.getAnnIds())


def test_coco_tiny_report_adds_up(coco_tiny_examples):
    _, artifact = coco_tiny_examples
    report = read_report(artifact.uri)
    assert report["images"] == {"in": 160, "written": 160, "rejected": 0}
    assert report["annotations"] == {"in": 1520, "written": 1520, "rejected": 0}
    assert report["output_splits"] == {
        "eval": {"images": 80, "annotations": 815},
        "train": {"images": 80, "annotations": 705},
    }
    props = artifact.mlmd_artifact.custom_properties
    assert props["images_written"].int_value == 160
    assert props["annotations_in"].int_value == 1520
    assert props["num_classes"].int_value == 80


def test_hash_split_of_one_file(coco_tiny_dir, tmp_path):
    artifact = run_example_gen(
        coco_tiny_dir,
        str(tmp_path),
        single_file="annotations/instances_val2017.json",
        image_dirs={"all": "val2017"},
        hash_buckets={"train": 3, "eval": 1},
    )
    train = read_examples(artifact.uri, "train")
    evaluation = read_examples(artifact.uri, "eval")
    assert len(train) + len(evaluation) == 80
    assert 0 < len(evaluation) < len(train)
    train_ids = {feature_values(e, features.IMAGE_ID)[0] for e in train}
    eval_ids = {feature_values(e, features.IMAGE_ID)[0] for e in evaluation}
    assert not train_ids & eval_ids
    report = read_report(artifact.uri)
    assert report["output_splits"]["eval"]["images"] == len(evaluation)
    assert report["images"] == {"in": 80, "written": 80, "rejected": 0}


# --------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing lost.


def _jpeg(width, height, mode="RGB", color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    fill = color if mode == "RGB" else (color[0] if mode == "L" else (*color, 0))
    Image.new(mode, (width, height), fill).save(out, format="JPEG")
    return out.getvalue()


def _truncated_jpeg(width, height) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def _png(width, height, mode="RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 0 if mode == "L" else (10, 200, 30, 255)).save(
        out, format="PNG"
    )
    return out.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
    data = bytearray(_png(1, 1, mode="L"))
    ihdr = 8 + 8  # Signature, then chunk length + type.
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _box_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """A COCO dataset with one image or annotation for each failure mode, plus good ones."""
    root = tmp_path_factory.mktemp("bad_coco")
    images_dir = root / "images"
    images_dir.mkdir()
    outside = root / "outside.jpg"
    outside.write_bytes(_jpeg(40, 30))
    files = {
        "good.jpg": _jpeg(40, 30),
        "good2.jpg": _jpeg(40, 30, color=(0, 0, 250)),
        "gray.jpg": _jpeg(40, 30, mode="L"),
        "cmyk.jpg": _jpeg(40, 30, mode="CMYK"),
        "rgba.png": _png(40, 30),
        "corrupt.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg",
        "truncated.jpg": _truncated_jpeg(400, 300),
        "wrong_size.jpg": _jpeg(41, 30),
        "bomb.png": _png_bomb(100_000, 100_000),
    }
    for name, data in files.items():
        (images_dir / name).write_bytes(data)
    os.symlink(outside, images_dir / "link_out.jpg")

    names = [
        "good.jpg",
        "good2.jpg",
        "gray.jpg",
        "cmyk.jpg",
        "rgba.png",
        "missing.jpg",
        "corrupt.jpg",
        "truncated.jpg",
        "wrong_size.jpg",
        "bomb.png",
        "../outside.jpg",
        str(outside),
        "link_out.jpg",
    ]
    images = [
        {
            "id": i + 1,
            "file_name": n,
            "width": 400 if n == "truncated.jpg" else 40,
            "height": 300 if n == "truncated.jpg" else 30,
        }
        for i, n in enumerate(names)
    ]
    images[9]["width"] = images[9]["height"] = 100_000
    images.append({"id": 1, "file_name": "good2.jpg", "width": 40, "height": 30})  # Duplicate id.
    cats = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    anns = []

    def add(image_id, category_id=5, segmentation=None, bbox=(2, 2, 10, 10), **extra):
        ann_id = extra.pop("ann_id", len(anns) + 1)
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": segmentation if segmentation is not None else _box_polygon(*bbox),
                "area": 100.0,
                "bbox": list(bbox),
                "iscrowd": 0,
                **extra,
            }
        )

    add(1)  # 1: good.
    add(1, category_id=9, bbox=(20, 5, 15, 20))  # 2: good.
    add(1, category_id=42)  # 3: unknown category.
    add(777)  # 4: unknown image.
    add(1, segmentation=[[1, 1, 5, 5]])  # 5: two points.
    add(1, bbox=(3, 3, 0, 5))  # 6: zero-area box.
    add(1, bbox=(50, 40, 10, 10))  # 7: out-of-image box.
    add(1, ann_id=1)  # 8: duplicate annotation id.
    add(2, segmentation={"counts": [0, 30, 1170], "size": [30, 40]}, iscrowd=1)  # 9: crowd RLE.
    for image_id in range(3, 14):  # One good annotation on each remaining image.
        add(image_id)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_all.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return str(root), images, anns


@pytest.fixture(scope="module")
def bad_run(bad_dataset, tmp_path_factory):
    root, images, anns = bad_dataset
    out = str(tmp_path_factory.mktemp("bad_out"))
    artifact = run_example_gen(
        root,
        out,
        split_files={"train": "annotations/instances_all.json"},
        image_dirs={"train": "images"},
        max_reject_fraction=1.0,
        max_pixels=1_000_000,
    )
    return artifact, images, anns


def test_every_bad_image_is_reported_with_its_reason(bad_run):
    artifact, _, _ = bad_run
    report = read_report(artifact.uri)
    reasons = {(r["image_id"], r["reason"]) for r in report["rejected_images"]}
    assert reasons == {
        (6, "missing_file"),
        (7, "corrupt_image"),
        (8, "corrupt_image"),
        (9, "size_mismatch"),
        (10, "too_many_pixels"),
        (11, "unsafe_file_name"),
        (12, "unsafe_file_name"),
        (13, "unsafe_file_name"),
        (1, "duplicate_image_id"),
    }
    truncated = next(r for r in report["rejected_images"] if r["image_id"] == 8)
    assert "truncated" in truncated["detail"]
    duplicate = next(r for r in report["rejected_images"] if r["reason"] == "duplicate_image_id")
    assert duplicate["file_name"] == "good2.jpg"


def test_every_bad_annotation_is_reported_with_its_reason(bad_run):
    artifact, _, _ = bad_run
    report = read_report(artifact.uri)
    by_reason = report["rejected_by_reason"]["annotation"]
    assert by_reason == {
        "unknown_category": 1,
        "unknown_image": 1,
        "degenerate_polygon": 1,
        "zero_area_box": 1,
        "box_outside_image": 1,
        "duplicate_annotation_id": 1,
        "image_rejected": 8,
    }
    rejected_on_rejected_images = {
        r["image_id"] for r in report["rejected_annotations"] if r["reason"] == "image_rejected"
    }
    assert rejected_on_rejected_images == set(range(6, 14))


def test_report_counts_add_up_and_reach_mlmd(bad_run):
    artifact, images, anns = bad_run
    report = read_report(artifact.uri)
    for group, total in (("images", len(images)), ("annotations", len(anns))):
        counts = report[group]
        assert counts["in"] == total
        assert counts["in"] == counts["written"] + counts["rejected"]
    assert report["images"]["written"] == 5  # good, good2 (as id 2), gray, cmyk, rgba.
    written = read_examples(artifact.uri, "train")
    assert len(written) == 5
    assert (
        sum(len(feature_values(e, features.OBJECT_ANNOTATION_ID)) for e in written)
        == (report["annotations"]["written"])
    )
    props = artifact.mlmd_artifact.custom_properties
    assert props["images_rejected"].int_value == report["images"]["rejected"]
    assert props["annotations_written"].int_value == report["annotations"]["written"]


def test_non_rgb_images_are_converted_not_rejected(bad_run):
    artifact, _, _ = bad_run
    by_name = {
        feature_values(e, features.IMAGE_FILENAME)[0].decode(): e
        for e in read_examples(artifact.uri, "train")
    }
    for name, expected_format in (
        ("gray.jpg", b"jpeg"),
        ("cmyk.jpg", b"jpeg"),
        ("rgba.png", b"png"),
    ):
        example = by_name[name]
        assert feature_values(example, features.IMAGE_FORMAT)[0] == expected_format
        pixels = tf.io.decode_image(feature_values(example, features.IMAGE_ENCODED)[0]).numpy()
        assert pixels.shape == (30, 40, 3)
    gray = tf.io.decode_image(
        feature_values(by_name["gray.jpg"], features.IMAGE_ENCODED)[0]
    ).numpy()
    assert np.abs(gray[..., 0].astype(int) - gray[..., 2]).max() <= 1  # R == G == B.
    png = tf.io.decode_image(feature_values(by_name["rgba.png"], features.IMAGE_ENCODED)[0]).numpy()
    np.testing.assert_array_equal(png[0, 0], [10, 200, 30])  # Lossless.


def test_crowd_rle_is_kept(bad_run):
    artifact, _, _ = bad_run
    example = next(
        e
        for e in read_examples(artifact.uri, "train")
        if feature_values(e, features.IMAGE_ID)[0] == 2
    )
    assert feature_values(example, features.OBJECT_IS_CROWD) == [1]
    mask = mask_utils.decode(
        {"size": [30, 40], "counts": feature_values(example, features.OBJECT_MASK_RLE)[0]}
    )
    assert mask.sum() == 30 and mask[:, 0].all()  # Column-major: the first 30 pixels = column 0.


def test_reject_fraction_over_the_limit_fails_the_run(bad_dataset, tmp_path):
    root, _, _ = bad_dataset
    with pytest.raises(RuntimeError, match=r"rejected 9 of 14 images .* max_reject_fraction=5.0%"):
        run_example_gen(
            root,
            str(tmp_path),
            split_files={"train": "annotations/instances_all.json"},
            image_dirs={"train": "images"},
            max_pixels=1_000_000,
        )


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "instances_bad.json"
    path.write_text('{"images": [],\n "annotations": [}\n')
    with pytest.raises(
        ValueError, match=r"instances_bad\.json: malformed JSON at line 2, column 18"
    ):
        read_coco_json(str(path))
    path.write_text('{"images": []}')
    with pytest.raises(ValueError, match="missing or invalid 'annotations'"):
        read_coco_json(str(path))


def test_file_names_never_escape_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    os.symlink(tmp_path, root / "escape")
    assert resolve_image_path(str(root), "sub/a.jpg") == str(root / "sub" / "a.jpg")
    for bad in ("../x.jpg", "sub/../../x.jpg", "/etc/passwd", "escape/outside.jpg", "", "a//b"):
        assert resolve_image_path(str(root), bad) is None, bad
    # A symlink that resolves back inside the root is fine.
    assert resolve_image_path(str(root), "escape/root/sub/a.jpg") is not None


# --------------------------------------------------------------------------------------------
# Memory: what crosses a shuffle is compact, and no parse holds every parsed annotation.


def test_image_tasks_cross_a_shuffle_exactly():
    annotations = [
        {
            "id": 2**40 + 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [0, 0.1, 639.9999999999999, -0.0],
            "area": 1e-300,
            "iscrowd": 0,
            "segmentation": [[1 / 3, 2.0, 5, 7.25, 1e17, 0.5], [1, 2, 3, 4, 5, 6]],
            "attributes": {"note": "ünï 字", "occluded": True, "extra": None},
        },
        {"id": 8, "iscrowd": 1, "segmentation": {"counts": [0, 5, 95], "size": [10, 10]}},
        {"id": 9, "iscrowd": 1, "segmentation": {"counts": "PPZ3", "size": [10, 10]}},
    ]
    task = ImageTask("train", 1, "dir/ä.jpg", 480, 640, annotations)
    coder = beam.coders.registry.get_coder(object)  # What Beam encodes tasks with.
    decoded = coder.decode(coder.encode(task))
    assert repr(decoded) == repr(task)  # repr tells 1 from 1.0 and -0.0 from 0.0; == does not.


def test_image_tasks_are_compact_on_real_coco(coco_tiny_dir):
    data = read_coco_json(os.path.join(coco_tiny_dir, "annotations", "instances_val2017.json"))
    categories = CategoryMap.from_coco_categories(data["categories"])
    tasks = [t for t in index_coco(data, "eval", categories) if isinstance(t, ImageTask)]
    coder = beam.coders.registry.get_coder(object)
    encoded = [coder.encode(t) for t in tasks]
    assert [repr(coder.decode(e)) for e in encoded] == [repr(t) for t in tasks]
    plain = sum(len(pickle.dumps(vars(t), pickle.HIGHEST_PROTOCOL)) for t in tasks)
    assert sum(map(len, encoded)) < 0.6 * plain  # 0.46 with zlib 1.2.x.


def test_image_tasks_cross_the_shuffle_as_task_file_paths(coco_tiny_dir, bad_dataset, tmp_path):
    # Only file paths reach the shuffle; the tasks come back from the files exactly, in order.
    paths = (
        os.path.join(coco_tiny_dir, "annotations", "instances_val2017.json"),
        os.path.join(bad_dataset[0], "annotations", "instances_all.json"),
    )
    for number, path in enumerate(paths):
        data = read_coco_json(path)
        categories = CategoryMap.from_coco_categories(data["categories"])
        items = list(index_coco(data, "x", categories))
        task_dir = str(tmp_path / f"tasks{number}")
        outputs = list(_ParseAndIndex("x", categories.to_json(), task_dir).process(path))
        task_files = [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
        rejected = [o.value for o in outputs if getattr(o, "tag", None) == "rejected"]
        assert task_files and all(os.path.dirname(f) == task_dir for f in task_files)
        assert sorted(os.listdir(task_dir)) == sorted(map(os.path.basename, task_files))
        read_back = [task for f in task_files for task in read_task_file(f)]
        assert [repr(t) for t in read_back] == [repr(t) for t in items if isinstance(t, ImageTask)]
        assert [repr(r) for r in rejected] == [
            repr(r) for r in items if not isinstance(r, ImageTask)
        ]
        per_file = tasks_per_file(len(data["images"]))
        assert all(len(list(read_task_file(f))) <= per_file for f in task_files)


def test_task_files_are_many_and_small():
    assert tasks_per_file(10) == 1  # Every image its own piece of work.
    assert tasks_per_file(MIN_TASK_FILES * 12) == 12  # x16 demo train: 64 files.
    assert tasks_per_file(118_287) == MAX_TASKS_PER_FILE  # COCO train2017: 463 files.


def test_task_file_writer_streams_full_files(tmp_path):
    tasks = [
        ImageTask("train", i, f"{i}.jpg", 4, 5, [{"id": i, "bbox": [0, 0, 1, -0.0]}])
        for i in range(7)
    ]
    writer = TaskFileWriter(str(tmp_path / "tasks"), "train", per_file=3)
    paths = [writer.add(task) for task in tasks] + [writer.close()]
    assert [p is not None for p in paths] == [False, False, True] * 2 + [False, True]
    assert writer.close() is None
    files = [p for p in paths if p]
    assert [len(list(read_task_file(f))) for f in files] == [3, 3, 1]
    assert [repr(t) for f in files for t in read_task_file(f)] == [repr(t) for t in tasks]


def test_packed_annotations_index_exactly_as_parsed_ones(coco_tiny_dir, bad_dataset):
    for path in (
        os.path.join(coco_tiny_dir, "annotations", "instances_val2017.json"),
        os.path.join(bad_dataset[0], "annotations", "instances_all.json"),
    ):
        plain = read_coco_json(path)
        categories = CategoryMap.from_coco_categories(plain["categories"])
        expected = [repr(item) for item in index_coco(plain, "x", categories)]
        packed = read_coco_json(path, packed=True)
        assert all(isinstance(a, bytes) for a in packed["annotations"])
        assert [repr(item) for item in index_coco(packed, "x", categories)] == expected


def test_files_over_one_read_chunk_are_read_exactly(tmp_path):
    # Files are read in 1 MB pieces; a multi-byte character may straddle two of them.
    names = [f"{i}-ünï字.jpg" for i in range(120_000)]
    images = [{"id": i, "file_name": n, "height": 1, "width": 1} for i, n in enumerate(names)]
    data = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "字"}]}
    path = tmp_path / "instances_x.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert path.stat().st_size > 3 * 2**20
    assert read_coco_json(str(path)) == data


def test_reading_never_holds_every_parsed_annotation(tmp_path):
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(50)]
    annotations = [
        {
            "id": i,
            "image_id": i % 50,
            "category_id": 1,
            "bbox": [1.0, 2.0, 3.0, 4.0],
            "segmentation": [np.round(rng.uniform(0, 480, 200), 2).tolist()],
        }
        for i in range(1000)
    ]
    categories = [{"id": 1, "name": "a"}]
    path = tmp_path / "instances_x.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )

    def parse_peak(**kwargs):
        tracemalloc.start()
        try:
            data = read_coco_json(str(path), **kwargs)
            return data, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    full, full_peak = parse_peak()
    assert full["annotations"] == annotations
    scan, scan_peak = parse_peak(annotations=False)
    assert scan["images"] == images and scan["categories"] == categories
    assert scan["annotations"] == [None] * len(annotations)
    packed, packed_peak = parse_peak(packed=True)
    assert [unpack_annotation(a) for a in packed["annotations"]] == annotations
    # The file's text is read either way; the parsed polygons are several times its size.
    assert max(scan_peak, packed_peak) < 2.5 * path.stat().st_size < full_peak


# --------------------------------------------------------------------------------------------
# The writer: what the stock ExampleGen writer would produce, without its shuffle.


class _StockWriterExecutor(CocoExecutor):
    """The stock `BaseExampleGenExecutor.Do` (`WriteSplit`) writing our examples, and no more
    (no category map, no report totals in the artifact)."""

    def Do(self, input_dict, output_dict, exec_properties):
        self._report_dir = output_dict["examples"][0].uri
        self._task_dir = self._report_dir + "_image_tasks"  # Outside the artifact.
        BaseExampleGenExecutor.Do(self, input_dict, output_dict, exec_properties)


def _layout(uri: str) -> dict[str, list[str]]:
    """Folder -> sorted file names under an artifact, with shard numbers masked."""
    layout = {}
    for folder, _, names in os.walk(uri):
        rel = os.path.relpath(folder, uri)
        layout[rel] = sorted(re.sub(r"-\d{5}-of-\d{5}\.", "-N-of-N.", n) for n in names)
    return layout


def _examples_by_image_id(uri: str, split: str) -> dict[int, tf.train.Example]:
    examples = read_examples(uri, split)
    by_id = {feature_values(e, features.IMAGE_ID)[0]: e for e in examples}
    assert len(by_id) == len(examples)  # No image twice.
    return by_id


def test_output_is_what_the_stock_writer_writes(coco_tiny_examples, tmp_path):
    coco_dir, ours = coco_tiny_examples
    component = CocoExampleGen(
        coco_dir,
        split_files={
            "train": "annotations/instances_train2017.json",
            "eval": "annotations/instances_val2017.json",
        },
    )
    stock = standard_artifacts.Examples()
    stock.uri = str(tmp_path / "stock")
    context = BaseBeamExecutor.Context(
        beam_pipeline_args=["--direct_num_workers=1"], tmp_dir=str(tmp_path / "tmp")
    )
    _StockWriterExecutor(context).Do({}, {"examples": [stock]}, executor_exec_properties(component))

    layout = _layout(ours.uri)
    layout["."].remove(features.CATEGORY_MAP_FILENAME)
    assert layout == _layout(stock.uri)
    assert layout["Split-train"] == layout["Split-eval"] == ["data_tfrecord-N-of-N.gz"]
    assert ours.split_names == stock.split_names == '["train", "eval"]'
    stock_props = dict(stock.mlmd_artifact.custom_properties)
    assert sorted(stock_props) == ["file_format", "payload_format"]
    assert stock_props.items() <= dict(ours.mlmd_artifact.custom_properties).items()
    assert examples_utils.get_payload_format(ours) == example_gen_pb2.FORMAT_TF_EXAMPLE
    assert examples_utils.get_file_format(ours) == "tfrecords_gzip"

    for split, json_name in (("train", "train2017"), ("eval", "val2017")):
        examples = _examples_by_image_id(ours.uri, split)
        assert examples == _examples_by_image_id(stock.uri, split)  # Only the order may differ.
        with open(os.path.join(coco_dir, "annotations", f"instances_{json_name}.json")) as f:
            assert sorted(examples) == sorted(image["id"] for image in json.load(f)["images"])
