"""Cost of SOLOv2 target generation per image, next to the cost of decoding the image's JPEG.

Target generation runs per image in the SoloTargetGen Beam stage; it should cost less than the
JPEG decode that every input pipeline already pays. Prints one JSON object.

    .venv/bin/python -m benchmarks.targets [--coco-dir DIR] [--images 16] [--repeats 5]

Inputs are real coco_tiny images with all their annotations, as CocoExampleGen stores them
(JPEG bytes, boxes, masks as compressed COCO RLE), under two configs: the official 1x
(`solov2_r50_fpn_1x`: shorter side 800, longer side at most 1333, fixed 1344 x 1344 pad) and
the demo (`demo_cpu`: 256, 352 pad). Times are warm medians in milliseconds per image (each
function called `--repeats` times in a row, image after image):

* `target_gen_ms`: what SoloTargetGen does per image and variant, as its DoFn calls it:
  `TargetMaker.add_targets_to_record` with one variant (test scale, no flip), the serialized
  example in (masks as RLE), the serialized example with its targets out.
* `target_gen_recipe_ms`: the same with the training split's variants (short side x flip).
* `dense_compute_targets_ms`: `models.targets.compute_targets` alone, on full-resolution masks
  already decoded, resized (nearest) and padded to multiples of 32, `tf.function` traced once.
  SoloTargetGen no longer builds such masks; this was the figure reported before it.
* `decode_original_jpeg_ms`, `decode_resized_jpeg_ms`: `tf.io.decode_jpeg` of the original
  bytes and of the image re-encoded at the resized size; `*_over_*`: the ratios.
"""

import argparse
import contextlib
import io
import json
import os
import pathlib
import statistics
import time

import numpy as np
import tensorflow as tf

from components.coco_example_gen.coco_reader import ImageTask
from components.coco_example_gen.example_builder import build_example
from components.solo_targets.component import target_spec_for
from components.solo_targets.transform import TargetMaker
from models.targets import compute_targets

DEFAULT_COCO_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"
CONFIGS = {"official_800x1333": "solov2_r50_fpn_1x", "demo_256": "demo_cpu"}


def _load_images(coco_dir: pathlib.Path, count: int) -> list[dict]:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(coco_dir / "annotations/instances_val2017.json"))
    class_index = {cat_id: i for i, cat_id in enumerate(sorted(coco.getCatIds()))}
    images = []
    for img_id in sorted(coco.getImgIds())[:count]:  # a plain sample: the first images by id
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        jpeg = (coco_dir / "val2017" / info["file_name"]).read_bytes()
        height, width = info["height"], info["width"]
        # The example exactly as CocoExampleGen writes it (what SoloTargetGen reads).
        task = ImageTask("val", img_id, info["file_name"], height, width, anns)
        built, _ = build_example(task, str(coco_dir / "val2017"), class_index)
        example = tf.train.Example.FromString(built.serialized)
        images.append(
            {
                "example": example,
                "jpeg": jpeg,
                "height": height,
                "width": width,
                "masks": np.stack([coco.annToMask(a) for a in anns]),
                "boxes_xywh": np.array([a["bbox"] for a in anns], np.float64),
                "classes": np.array([class_index[a["category_id"]] for a in anns], np.int32),
                "is_crowd": np.array([a["iscrowd"] for a in anns], bool),
            }
        )
    return images


def _resized_size(height: int, width: int, short: int, long_cap: int) -> tuple[int, int]:
    scale = min(short / min(height, width), long_cap / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _dense_inputs(image: dict, short: int, long_cap: int) -> dict:
    """Masks resized (nearest) and padded to multiples of 32, boxes resized, resized JPEG."""
    h, w = image["height"], image["width"]
    new_h, new_w = _resized_size(h, w, short, long_cap)
    pad_h, pad_w = -(-new_h // 32) * 32, -(-new_w // 32) * 32
    rows = np.minimum((np.arange(new_h) + 0.5) * h / new_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(new_w) + 0.5) * w / new_w, w - 1).astype(np.int64)
    masks = np.zeros((len(image["masks"]), pad_h, pad_w), np.uint8)
    masks[:, :new_h, :new_w] = image["masks"][:, rows][:, :, cols]
    x, y, bw, bh = image["boxes_xywh"].T
    sy, sx = new_h / h, new_w / w
    boxes = np.stack([y * sy, x * sx, (y + bh) * sy, (x + bw) * sx], axis=1).astype(np.float32)
    pixels = tf.image.resize(tf.io.decode_jpeg(image["jpeg"], channels=3), [new_h, new_w])
    resized_jpeg = tf.io.encode_jpeg(tf.cast(tf.round(pixels), tf.uint8), quality=95)
    inputs = (boxes, image["classes"], masks, image["is_crowd"])
    return {"inputs": [tf.constant(x) for x in inputs], "resized_jpeg": resized_jpeg}


def _dense_targets_fn():
    return tf.function(
        lambda b, c, m, k: compute_targets(b, c, m, k),
        input_signature=[
            tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None, None], tf.uint8),
            tf.TensorSpec([None], tf.bool),
        ],
    )


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _geometry_report(images: list[dict], experiment: str, repeats: int) -> dict:
    spec = target_spec_for(experiment, "train")
    maker = TargetMaker(spec)
    dense_fn = _dense_targets_fn()
    test_scale = ((spec.variants[0][0], False),)
    per_image = []
    for image in images:
        dense = _dense_inputs(image, spec.variants[0][0], spec.max_size)
        record = image["example"].SerializeToString()
        fns = {
            "target_gen": lambda r=record: maker.add_targets_to_record(r, test_scale),
            "target_gen_recipe": lambda r=record: maker.add_targets_to_record(r, spec.variants),
            "dense_compute_targets": lambda x=dense["inputs"]: dense_fn(*x),
            "decode_original_jpeg": lambda j=image["jpeg"]: tf.io.decode_jpeg(j, channels=3),
            "decode_resized_jpeg": lambda j=dense["resized_jpeg"]: tf.io.decode_jpeg(j, channels=3),
        }
        per_image.append({name: _median_ms(fn, repeats) for name, fn in fns.items()})
    mean = {name: statistics.mean(t[name] for t in per_image) for name in per_image[0]}
    target_gen = [t["target_gen"] for t in per_image]
    return {
        "experiment": experiment,
        "padded_size": spec.pad,
        "recipe_variants": [list(v) for v in spec.variants],
        **{f"{name}_ms": round(value, 3) for name, value in mean.items()},
        "target_gen_over_decode_original": round(
            mean["target_gen"] / mean["decode_original_jpeg"], 3
        ),
        "target_gen_over_decode_resized": round(
            mean["target_gen"] / mean["decode_resized_jpeg"], 3
        ),
        "target_gen_recipe_over_decode_original": round(
            mean["target_gen_recipe"] / mean["decode_original_jpeg"], 3
        ),
        "dense_compute_targets_over_decode_original": round(
            mean["dense_compute_targets"] / mean["decode_original_jpeg"], 3
        ),
        "images_where_target_gen_is_cheaper": sum(
            t["target_gen"] < t["decode_original_jpeg"] for t in per_image
        ),
        "target_gen_ms_max": round(max(target_gen), 3),
        "target_gen_ms_max_image_instances": len(
            images[target_gen.index(max(target_gen))]["classes"]
        ),
    }


def run(coco_dir: pathlib.Path, num_images: int, repeats: int) -> dict:
    if not (coco_dir / "annotations/instances_val2017.json").exists():
        return {"skipped": f"coco_tiny not found at {coco_dir}"}
    images = _load_images(coco_dir, num_images)
    report = {
        "images": len(images),
        "instances_per_image": [len(im["classes"]) for im in images],
        "original_sizes": [[im["height"], im["width"]] for im in images],
        "repeats": repeats,
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "cpus": os.cpu_count(),
        },
    }
    for name, experiment in CONFIGS.items():
        report[name] = _geometry_report(images, experiment, repeats)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-dir", type=pathlib.Path, default=DEFAULT_COCO_DIR)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.coco_dir, args.images, args.repeats), indent=2))


if __name__ == "__main__":
    main()
