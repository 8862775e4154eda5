"""The best mask AP a stride-4 SOLO mask can reach on a COCO split: perfect detection, class
and score, imperfect only in the mask's resolution.

SOLOv2 predicts each instance's mask at 1/4 of the padded input and pastes it back with
`models.postprocess.paste_masks` (bilinear x4, crop, bilinear to the original size, > 0.5). Every
ground-truth instance (crowd regions excepted) is run through that representation, at the
experiment's test resize, as two "oracle" detections with score 1 and the right class:

- ``target``: the training target, the resized mask (nearest, as `preprocess.resize_masks`)
  downsampled by `models.targets.downsample_masks` (binary at 1/4 scale). What the Dice loss
  pulls the prediction towards; a model that learned its targets perfectly scores this.
- ``soft``: the resized mask's 4x4 block means (a soft mask at 1/4 scale): the most a stride-4
  output can express, sub-cell boundaries included.

The AP these oracles reach is the ceiling of the model's mask resolution on this data, before
any recognition error: objects a few pixels wide at the input resolution cannot reach high
IoU thresholds through a 4x coarser mask. `pycocotools` `COCOeval(iouType="segm")` on the
split's own annotation file scores them. Prints one JSON object.

Run: ``python -m benchmarks.mask_ceiling [--coco-dir demo_data]
[--annotation-file annotations/instances_val.json] [--config demo_cpu]
[--short-side S --max-size M]`` (defaults: the config's test resize).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from models import postprocess, preprocess  # noqa: E402
from models.config import get_experiment  # noqa: E402
from models.targets import downsample_masks  # noqa: E402
from pipeline.demo_data import generate_demo_dataset  # noqa: E402

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ORACLES = ("target", "soft")


def oracle_masks(mask: np.ndarray, short_side: int, max_size: int) -> dict[str, np.ndarray]:
    """One `[H, W]` {0,1} mask -> each oracle's `[H, W]` bool mask on the original image."""
    height, width = mask.shape
    new_height, new_width = (
        int(v) for v in preprocess.resized_shape(height, width, short_side, max_size)
    )
    pad = preprocess.padded_size(max_size)
    resized = preprocess.resize_masks(tf.constant(mask[None], tf.uint8), new_height, new_width)
    padded = preprocess.pad_to(resized, pad)  # [1, P, P]
    quarter = pad // 4
    soft = tf.reduce_mean(
        tf.reshape(tf.cast(padded, tf.float32), [1, quarter, 4, quarter, 4]), axis=[2, 4]
    )
    info = tf.constant([height, width, new_height, new_width])
    return {
        "target": postprocess.paste_masks(tf.cast(downsample_masks(padded), tf.float32), info)[
            0
        ].numpy(),
        "soft": postprocess.paste_masks(soft, info)[0].numpy(),
    }


def mask_ceiling(annotation_file: str, short_side: int, max_size: int) -> dict:
    """Oracle mask AP of the split in `annotation_file` at the given test resize.

    Returns `{oracle: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}` for each of `ORACLES`, plus
    `images` and `instances` (non-crowd annotations scored).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotation_file)
    detections = {oracle: [] for oracle in ORACLES}
    instances = 0
    for image_id in sorted(ground_truth.getImgIds()):
        for annotation in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_id)):
            if annotation.get("iscrowd", 0):
                continue
            instances += 1
            masks = oracle_masks(ground_truth.annToMask(annotation), short_side, max_size)
            for oracle, mask in masks.items():
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                detections[oracle].append(
                    {
                        "image_id": image_id,
                        "category_id": annotation["category_id"],
                        "segmentation": rle,
                        "score": 1.0,
                    }
                )
    result = {"images": len(ground_truth.getImgIds()), "instances": instances}
    for oracle, oracle_detections in detections.items():
        if not oracle_detections:
            result[oracle] = {name: -1.0 for name in STAT_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(oracle_detections), "segm")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        result[oracle] = {
            name: float(value)
            for name, value in zip(STAT_NAMES, evaluation.stats[[0, 1, 2, 3, 4, 5]])
        }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--coco-dir",
        default=None,
        help="default: demo_data/, or a generated val split if that is absent",
    )
    parser.add_argument("--annotation-file", default="annotations/instances_val.json")
    parser.add_argument("--config", default="demo_cpu")
    parser.add_argument("--short-side", type=int, default=None)
    parser.add_argument("--max-size", type=int, default=None)
    args = parser.parse_args(argv)
    model = get_experiment(args.config).model
    short_side = args.short_side or model.image_short_side
    max_size = args.max_size or model.image_max_size
    coco_dir = args.coco_dir
    if coco_dir is None:
        coco_dir = "demo_data"
        if not os.path.exists(os.path.join(coco_dir, args.annotation_file)):
            coco_dir = tempfile.mkdtemp(prefix="mask_ceiling_")
            generate_demo_dataset(coco_dir, num_train=0)  # Only val is scored.
    result = mask_ceiling(os.path.join(coco_dir, args.annotation_file), short_side, max_size)
    print(
        json.dumps(
            {"config": args.config, "short_side": short_side, "max_size": max_size, **result},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
