"""Cost of SOLOv2 target generation per image, next to the cost of decoding the image's JPEG.

Target generation runs per image in the SoloTargetGen Beam stage; it should cost less than the
JPEG decode that every input pipeline already pays. Prints one JSON object.

    .venv/bin/python -m benchmarks.targets [--coco-dir DIR] [--images 16] [--repeats 9]

Inputs are real coco_tiny images with all their annotations, as CocoExampleGen stores them
(JPEG bytes, boxes, masks as compressed COCO RLE), under three configs: the official 1x
(`solov2_r50_fpn_1x`: shorter side 800, longer side at most 1333, fixed 1344 x 1344 pad; its
training recipe has 2 variants, 800 x flip), the official 3x (`solov2_r50_fpn_3x`: the same
geometry, 12 variants, shorter sides 640..800 x flip) and the demo (`demo_cpu`: 256, 352 pad,
2 variants). Times are warm medians in milliseconds per image. Every
measurement is taken once per round, all of them in a random order, for `--repeats` rounds: the
ratios compare figures taken under the same load (the machine may be shared).

* `target_gen_batched_ms`: what SoloTargetGen does, as its DoFn runs it: batches of
  `component.BATCH_SIZE` serialized examples (the last one smaller when the images do not
  fill it), each through one `TargetMaker.add_targets_to_records` call with one variant (test
  scale, no flip); batch time / images in the batch.
* `target_gen_recipe_batched_ms`: the same with the training split's variants (short side x flip).
* `target_gen_ms`, `target_gen_recipe_ms`: the single-image path, one
  `TargetMaker.add_targets_to_record` call per image (a batch of one).
* `dense_compute_targets_ms`: `models.targets.compute_targets` alone, on full-resolution masks
  already decoded, resized (nearest) and padded to multiples of 32, `tf.function` traced once.
  SoloTargetGen no longer builds such masks; this was the figure reported before it.
* `decode_original_jpeg_ms`, `decode_resized_jpeg_ms`: `tf.io.decode_jpeg` of the original
  bytes and of the image re-encoded at the resized size; `*_over_*`: the ratios (per-image
  means over the images), `batching_speedup`: `target_gen_ms / target_gen_batched_ms`.
"""

import argparse
import contextlib
import functools
import io
import json
import os
import pathlib
import random
import statistics
import time

import numpy as np
import tensorflow as tf

from components.coco_example_gen.coco_reader import ImageTask
from components.coco_example_gen.example_builder import build_example
from components.solo_targets.component import BATCH_SIZE, target_spec_for
from components.solo_targets.transform import TargetMaker
from models.targets import compute_targets

DEFAULT_COCO_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"
CONFIGS = {
    "official_800x1333": "solov2_r50_fpn_1x",
    "official_3x_multiscale": "solov2_r50_fpn_3x",
    "demo_256": "demo_cpu",
}


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


def _interleaved_medians_ms(fns: dict, repeats: int) -> dict:
    """Median time (ms) of each function, called once per round, after a warm-up. Each round
    calls them all in a new random order, so that none always follows the same one."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def _geometry_report(images: list[dict], experiment: str, repeats: int, batch_size: int) -> dict:
    spec = target_spec_for(experiment, "train")
    maker = TargetMaker(spec)
    dense_fn = _dense_targets_fn()
    test_scale = ((spec.variants[0][0], False),)
    per_image = {}  # (image, name) -> function of one image
    for i, image in enumerate(images):
        dense = _dense_inputs(image, spec.variants[0][0], spec.max_size)
        record = image["example"].SerializeToString()
        fns = {
            "target_gen": lambda r=record: maker.add_targets_to_record(r, test_scale),
            "target_gen_recipe": lambda r=record: maker.add_targets_to_record(r, spec.variants),
            "dense_compute_targets": lambda x=dense["inputs"]: dense_fn(*x),
            "decode_original_jpeg": lambda j=image["jpeg"]: tf.io.decode_jpeg(j, channels=3),
            "decode_resized_jpeg": lambda j=dense["resized_jpeg"]: tf.io.decode_jpeg(j, channels=3),
        }
        per_image.update({(i, name): fn for name, fn in fns.items()})
    records = [image["example"].SerializeToString() for image in images]
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    per_batch = {}  # (batch, name) -> function of one batch
    for b, batch in enumerate(batches):
        for name, variants in (
            ("target_gen_batched", test_scale),
            ("target_gen_recipe_batched", spec.variants),
        ):
            per_batch[b, name] = functools.partial(maker.add_targets_to_records, batch, variants)
    medians = _interleaved_medians_ms({**per_image, **per_batch}, repeats)

    names = {name for _, name in per_image} | {name for _, name in per_batch}
    mean = {
        name: sum(t for (_, n), t in medians.items() if n == name) / len(images) for name in names
    }
    target_gen = [medians[i, "target_gen"] for i in range(len(images))]

    def ratio(numerator, denominator):
        return round(mean[numerator] / mean[denominator], 3)

    return {
        "experiment": experiment,
        "padded_size": spec.pad,  # the square; training targets use orientation pads if set
        "orientation_pad": spec.orientation_pad,
        "recipe_variants": [list(v) for v in spec.variants],
        "batch_size": batch_size,
        **{f"{name}_ms": round(mean[name], 3) for name in sorted(names)},
        "target_gen_batched_over_decode_original": ratio(
            "target_gen_batched", "decode_original_jpeg"
        ),
        "target_gen_batched_over_decode_resized": ratio(
            "target_gen_batched", "decode_resized_jpeg"
        ),
        "target_gen_recipe_batched_over_decode_original": ratio(
            "target_gen_recipe_batched", "decode_original_jpeg"
        ),
        "target_gen_over_decode_original": ratio("target_gen", "decode_original_jpeg"),
        "target_gen_over_decode_resized": ratio("target_gen", "decode_resized_jpeg"),
        "target_gen_recipe_over_decode_original": ratio(
            "target_gen_recipe", "decode_original_jpeg"
        ),
        "dense_compute_targets_over_decode_original": ratio(
            "dense_compute_targets", "decode_original_jpeg"
        ),
        "batching_speedup": ratio("target_gen", "target_gen_batched"),
        "images_where_target_gen_is_cheaper": sum(
            medians[i, "target_gen"] < medians[i, "decode_original_jpeg"]
            for i in range(len(images))
        ),
        "target_gen_ms_max": round(max(target_gen), 3),
        "target_gen_ms_max_image_instances": len(
            images[target_gen.index(max(target_gen))]["classes"]
        ),
    }


def run(coco_dir: pathlib.Path, num_images: int, repeats: int, batch_size: int) -> dict:
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
        report[name] = _geometry_report(images, experiment, repeats, batch_size)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-dir", type=pathlib.Path, default=DEFAULT_COCO_DIR)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="default: SoloTargetGen's batch size"
    )
    args = parser.parse_args()
    print(json.dumps(run(args.coco_dir, args.images, args.repeats, args.batch_size), indent=2))


if __name__ == "__main__":
    main()
