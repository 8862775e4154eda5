"""Cost of SOLOv2 target generation per image, next to the cost of decoding the image's JPEG.

Target generation runs per image in the SoloTargetGen Beam stage and in tf.data; it should cost
less than the JPEG decode that every input pipeline already pays. Prints one JSON object.

    .venv/bin/python -m benchmarks.targets [--coco-dir DIR] [--images 16] [--repeats 5]

Inputs are real coco_tiny images with all their annotations (masks from pycocotools), resized
like the official pipeline (shorter side 800, longer side capped at 1333; masks nearest
neighbour here) and zero-padded to multiples of 32, and again at the demo size (shorter side 256).
Times are warm medians in milliseconds: `tf.function` target generation (dynamic-shape signature,
traced once) vs `tf.io.decode_jpeg` of the original JPEG bytes and of the image re-encoded as a
JPEG at the resized size.
"""

import argparse
import json
import os
import pathlib
import statistics
import time

import numpy as np
import tensorflow as tf

from models.targets import compute_targets

DEFAULT_COCO_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"


def _resized_size(height: int, width: int, short: int, long_cap: int) -> tuple[int, int]:
    scale = min(short / min(height, width), long_cap / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _load_images(coco_dir: pathlib.Path, count: int) -> list[dict]:
    from pycocotools.coco import COCO

    coco = COCO(str(coco_dir / "annotations/instances_val2017.json"))
    class_index = {cat_id: i for i, cat_id in enumerate(sorted(coco.getCatIds()))}
    images = []
    img_ids = sorted(coco.getImgIds())[:count]  # a plain sample: the first images by id
    for img_id in img_ids:
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        images.append(
            {
                "jpeg": (coco_dir / "val2017" / info["file_name"]).read_bytes(),
                "height": info["height"],
                "width": info["width"],
                "masks": np.stack([coco.annToMask(a) for a in anns]),
                "boxes_xywh": np.array([a["bbox"] for a in anns], np.float64),
                "classes": np.array([class_index[a["category_id"]] for a in anns], np.int32),
                "is_crowd": np.array([a["iscrowd"] for a in anns], bool),
            }
        )
    return images


def _prepare(image: dict, short: int, long_cap: int) -> dict:
    """Resize masks (nearest) and boxes, pad to multiples of 32, re-encode the resized image."""
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
    return {
        "inputs": (boxes, image["classes"], masks, image["is_crowd"]),
        "resized_jpeg": resized_jpeg,
        "padded_size": [pad_h, pad_w],
    }


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _targets_fn():
    return tf.function(
        lambda b, c, m, k: compute_targets(b, c, m, k),
        input_signature=[
            tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None, None], tf.uint8),
            tf.TensorSpec([None], tf.bool),
        ],
    )


def run(coco_dir: pathlib.Path, num_images: int, repeats: int) -> dict:
    if not (coco_dir / "annotations/instances_val2017.json").exists():
        return {"skipped": f"coco_tiny not found at {coco_dir}"}
    images = _load_images(coco_dir, num_images)
    targets_fn = _targets_fn()
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
    original_decode = [
        _median_ms(lambda im=im: tf.io.decode_jpeg(im["jpeg"], channels=3), repeats)
        for im in images
    ]
    for name, (short, long_cap) in {
        "official_800x1333": (800, 1333),
        "demo_256": (256, 1333),
    }.items():
        prepared = [_prepare(im, short, long_cap) for im in images]
        inputs = [[tf.constant(x) for x in p["inputs"]] for p in prepared]
        target_ms = [_median_ms(lambda x=x: targets_fn(*x), repeats) for x in inputs]
        resized_decode = [
            _median_ms(lambda p=p: tf.io.decode_jpeg(p["resized_jpeg"], channels=3), repeats)
            for p in prepared
        ]
        mean_targets = statistics.mean(target_ms)
        report[name] = {
            "padded_sizes": [p["padded_size"] for p in prepared],
            "targets_ms_per_image": round(mean_targets, 3),
            "decode_original_jpeg_ms": round(statistics.mean(original_decode), 3),
            "decode_resized_jpeg_ms": round(statistics.mean(resized_decode), 3),
            "targets_over_decode_original": round(
                mean_targets / statistics.mean(original_decode), 3
            ),
            "targets_over_decode_resized": round(mean_targets / statistics.mean(resized_decode), 3),
            "targets_ms_max": round(max(target_ms), 3),
            "targets_ms_max_image_instances": len(
                images[target_ms.index(max(target_ms))]["classes"]
            ),
        }
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
