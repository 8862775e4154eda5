"""Mask AP against training steps: one run, evaluated at several step counts.

Trains a named experiment (with optional overrides) on SoloTargetGen targets in segments that
resume from one checkpoint folder (`models.train.train`), exports after each segment and
evaluates the export on the eval split of the CocoExampleGen examples
(`components.mask_evaluator.runner.evaluate_saved_model`). Each segment's schedule is the
recipe's step schedule (its own `lr_steps` in epochs) stretched over that segment's total; with
`--decay-epoch E` the schedule is `lr_steps=(E,)` instead, so every segment of a long recipe
ends with a short decay (x `lr_decay` over its last part) and resumes at the full rate.

With `--annotations` (the eval split's COCO file), each point also reports the AP with every
class merged into one (class-agnostic) and with each detection relabelled to the class of its
best-IoU ground truth (perfect classes), which separates classification errors from masks.
`--first N` restricts the evaluation to the first N eval images (sorted ids) as well. It also
sorts the `--top` best-scored detections by what they are (`error_breakdown`): true positive,
duplicate, right mask with the wrong class, poorly localised or background, plus a confusion
count of (true class, predicted class) over those that cover an object.

Prints one JSON line per point. Example (the README's learning curve):

    .venv/bin/python scripts/learning_curve.py --targets OUT/pipeline_root/SoloTargetGen/targets/4 \\
        --examples OUT/pipeline_root/CocoExampleGen/examples/1 --output /tmp/curve \\
        --steps 650,1300,1950,2600 --annotations DATA/annotations/instances_val.json --first 16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import time

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.mask_evaluator.runner import evaluate_saved_model
from models import train as train_lib
from models.config import apply_overrides, get_experiment

STATS = ("AP", "AP50", "APs", "APm", "APl")


def _segm_stats(ground_truth: COCO, detections: list, image_ids: list | None) -> dict:
    if not detections:  # pycocotools cannot load an empty result list; nothing found is AP 0.
        return {name: 0.0 for name in STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(copy.deepcopy(detections)), "segm")
        if image_ids:
            evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: round(float(evaluation.stats[i]), 4) for name, i in zip(STATS, (0, 1, 3, 4, 5))}


def class_analysis(annotation_file: str, detections: list, first: int | None) -> dict:
    """AP as is, class-agnostic and with perfect classes (see the module docstring)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotation_file)
    image_ids = sorted(ground_truth.getImgIds())[:first] if first else None
    merged = copy.deepcopy(ground_truth.dataset)
    for annotation in merged["annotations"]:
        annotation["category_id"] = 1
    merged["categories"] = [{"id": 1, "name": "object"}]
    with contextlib.redirect_stdout(io.StringIO()):
        agnostic = COCO()
        agnostic.dataset = merged
        agnostic.createIndex()
    relabelled = []
    for detection in detections:
        annotations = [
            a
            for a in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=detection["image_id"]))
            if not a["iscrowd"]
        ]
        if annotations:
            ious = mask_utils.iou(
                [detection["segmentation"]],
                [ground_truth.annToRLE(a) for a in annotations],
                [0] * len(annotations),
            )[0]
            detection = dict(
                detection, category_id=annotations[int(np.argmax(ious))]["category_id"]
            )
        relabelled.append(detection)
    return {
        "as_is": _segm_stats(ground_truth, detections, image_ids),
        "class_agnostic": _segm_stats(
            agnostic, [dict(d, category_id=1) for d in detections], image_ids
        ),
        "perfect_classes": _segm_stats(ground_truth, relabelled, image_ids),
    }


ERROR_KINDS = ("true_positive", "duplicate", "wrong_class", "poor_localisation", "background")


def error_breakdown(
    annotation_file: str, detections: list, top: int, iou_threshold: float = 0.5
) -> dict:
    """What the `top` best-scored detections are, matched greedily per image by score.

    Each detection is, against the non-crowd objects of its image: a `true_positive` if it
    covers (IoU >= `iou_threshold`) an object of its class not yet matched; a `duplicate` if
    every such object is matched already; `wrong_class` if it covers only objects of other
    classes; `poor_localisation` if its best IoU with any object is in [0.1, threshold);
    `background` below that. Detections on images without objects are `background`.

    Returns `{"top": n, kind: count for kind in ERROR_KINDS, "confusion": {"true -> predicted":
    count}}`, the confusion over the detections that cover an object (the best-IoU object's
    class against the detection's), by category name.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotation_file)
    ranked = sorted(detections, key=lambda d: -d["score"])[:top]
    counts = dict.fromkeys(ERROR_KINDS, 0)
    confusion: dict[str, int] = {}
    matched: dict[int, set] = {}
    for detection in ranked:
        image_id = detection["image_id"]
        objects = [
            a
            for a in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_id))
            if not a["iscrowd"]
        ]
        if not objects:
            counts["background"] += 1
            continue
        ious = mask_utils.iou(
            [detection["segmentation"]],
            [ground_truth.annToRLE(a) for a in objects],
            [0] * len(objects),
        )[0]
        covered = [i for i in range(len(objects)) if ious[i] >= iou_threshold]
        same_class = [i for i in covered if objects[i]["category_id"] == detection["category_id"]]
        taken = matched.setdefault(image_id, set())
        free = [i for i in same_class if objects[i]["id"] not in taken]
        if free:
            taken.add(objects[max(free, key=lambda i: ious[i])]["id"])
            counts["true_positive"] += 1
        elif same_class:
            counts["duplicate"] += 1
        elif covered:
            counts["wrong_class"] += 1
        elif ious.max() >= 0.1:
            counts["poor_localisation"] += 1
        else:
            counts["background"] += 1
        if covered:
            best = objects[int(np.argmax(ious))]
            key = (
                f"{ground_truth.cats[best['category_id']]['name']} -> "
                f"{ground_truth.cats[detection['category_id']]['name']}"
            )
            confusion[key] = confusion.get(key, 0) + 1
    return {"top": len(ranked), **counts, "confusion": dict(sorted(confusion.items()))}


def curve_config(experiment: str, overrides: dict, decay_epoch: int | None):
    """The named experiment with `overrides`; `decay_epoch` (if given) sets `lr_steps=(E,)`.

    Without it the recipe keeps its own `lr_steps`, so each segment follows the recipe's
    schedule stretched over the segment's total steps.
    """
    overrides = copy.deepcopy(overrides)
    if decay_epoch is not None:
        overrides.setdefault("train", {}).setdefault("lr_steps", [decay_epoch])
    return apply_overrides(get_experiment(experiment), overrides)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", required=True, help="SoloTargetGen artifact folder")
    parser.add_argument("--examples", required=True, help="CocoExampleGen artifact folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", required=True, help="comma-separated step counts")
    parser.add_argument("--experiment", default="demo_cpu")
    parser.add_argument("--overrides", default="{}", help='JSON {"model": {..}, "train": {..}}')
    parser.add_argument(
        "--decay-epoch",
        type=int,
        default=None,
        help="lr_steps=(E,) of the recipe's epochs (default: the recipe's own lr_steps)",
    )
    parser.add_argument("--annotations", default=None)
    parser.add_argument("--first", type=int, default=None)
    parser.add_argument("--top", type=int, default=400, help="detections in error_breakdown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    config = curve_config(args.experiment, json.loads(args.overrides), args.decay_epoch)
    with open(os.path.join(args.targets, "category_map.json")) as f:
        category_map = json.load(f)
    for total in (int(s) for s in args.steps.split(",")):
        start = time.perf_counter()
        serving = os.path.join(args.output, f"serving_{total}")
        summary = train_lib.train(
            config,
            os.path.join(args.targets, "Split-train", "*"),
            os.path.join(args.output, "model"),
            serving,
            total,
            category_map=category_map,
            seed=args.seed,
        )
        train_seconds = time.perf_counter() - start
        result = evaluate_saved_model(
            serving, os.path.join(args.examples, "Split-eval", "*"), category_map
        )
        point = {
            "steps": total,
            "train_seconds": round(train_seconds),
            "step_time": summary["step_time"],
            "loss": summary["metrics"].get("total_loss"),
            "images": result["num_images"],
            "segm": {name: round(result["segm"][name], 4) for name in STATS},
        }
        if args.annotations:
            point.update(class_analysis(args.annotations, result["detections"], args.first))
            point["errors"] = error_breakdown(args.annotations, result["detections"], args.top)
        print(json.dumps(point), flush=True)


if __name__ == "__main__":
    main()
