"""MaskEvaluator: the evaluation loop on real SavedModels with known answers, and the blessing.

One small demo dataset goes through the real CocoExampleGen executor (split `eval`, plus split
`sparse`: the same images with the annotations of two of them removed). The models are real
SavedModels from `tests/oracle_model.py`: an oracle returning the ground truth, a noisy oracle
(half the objects dropped) and an empty model.

The oracle is exported at 4x the demo test scale, so that the quarter-resolution serving masks
hold the original masks without loss: any AP it misses is a bug in ids, categories or geometry.
At the real demo scale (256 / 352) small objects occupy 2-3 quarter-resolution pixels and the
paste round trip cannot reproduce them; that ceiling is pinned separately.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from tfx.types import standard_artifacts

from components.mask_evaluator import coco_metrics
from components.mask_evaluator.component import MaskEvaluator, blessing_decision
from components.mask_evaluator.runner import evaluate_saved_model, load_category_map
from pipeline.demo_data import CATEGORIES, generate_demo_dataset
from schemas import features
from tests.example_gen_utils import feature_values, read_examples, run_example_gen
from tests.oracle_model import export_empty_model, export_oracle_model

NUM_IMAGES = 6
UNANNOTATED_IMAGE_IDS = (2, 5)  # In split "sparse".
LOSSLESS = {"short_side": 1024, "max_size": 1408}  # 4x the demo scale: quarter res = original.
COCO_IDS = {c["id"] for c in CATEGORIES}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> standard_artifacts.Examples:
    root = tmp_path_factory.mktemp("mask_eval_data")
    generate_demo_dataset(root, num_train=0, num_val=NUM_IMAGES)
    with open(root / "annotations" / "instances_val.json") as f:
        coco = json.load(f)
    coco["annotations"] = [
        a for a in coco["annotations"] if a["image_id"] not in UNANNOTATED_IMAGE_IDS
    ]
    with open(root / "annotations" / "instances_sparse.json", "w") as f:
        json.dump(coco, f)
    return run_example_gen(
        str(root),
        str(tmp_path_factory.mktemp("mask_eval_examples")),
        split_files={
            "eval": "annotations/instances_val.json",
            "sparse": "annotations/instances_sparse.json",
        },
    )


@pytest.fixture(scope="module")
def models(examples, tmp_path_factory) -> dict[str, standard_artifacts.Model]:
    """Model artifacts (uri/Format-Serving holds the SavedModel), with distinct MLMD ids."""
    root = tmp_path_factory.mktemp("mask_eval_models")
    eval_examples = read_examples(examples.uri, "eval")
    builders = {
        "oracle": lambda d: export_oracle_model(eval_examples, d, **LOSSLESS),
        "noisy": lambda d: export_oracle_model(eval_examples, d, keep_every=2, **LOSSLESS),
        "demo_scale": lambda d: export_oracle_model(eval_examples, d),
        "empty": export_empty_model,
    }
    artifacts = {}
    for model_id, (name, build) in enumerate(builders.items(), start=1):
        artifact = standard_artifacts.Model()
        artifact.uri = str(root / name)
        artifact.id = model_id
        build(os.path.join(artifact.uri, "Format-Serving"))
        artifacts[name] = artifact
    return artifacts


def _evaluate(models, examples, name, split="eval"):
    return evaluate_saved_model(
        os.path.join(models[name].uri, "Format-Serving"),
        os.path.join(examples.uri, f"Split-{split}", "*"),
        load_category_map(examples.uri),
        batch_size=4,  # Two batches of an uneven size.
    )


@pytest.fixture(scope="module")
def oracle_result(models, examples):
    return _evaluate(models, examples, "oracle")


@pytest.fixture(scope="module")
def empty_run(models, examples):
    """The empty model's result, and what the evaluator handed to COCOeval (segm run)."""
    calls = []
    original = coco_metrics._run_cocoeval

    def spy(images, categories, gt_annotations, detections, iou_type):
        # COCOeval writes flags into the dicts: keep what it was given.
        calls.append(copy.deepcopy((iou_type, images, categories, gt_annotations, detections)))
        return original(images, categories, gt_annotations, detections, iou_type)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_metrics, "_run_cocoeval", spy)
        result = _evaluate(models, examples, "empty")
    return result, {call[0]: call[1:] for call in calls}


def _objects(examples_uri, split):
    """(image_id, category_id, is_crowd) of every stored object of a split."""
    return [
        (feature_values(ex, features.IMAGE_ID)[0], category_id, crowd)
        for ex in read_examples(examples_uri, split)
        for category_id, crowd in zip(
            feature_values(ex, features.OBJECT_CATEGORY_ID),
            feature_values(ex, features.OBJECT_IS_CROWD),
        )
    ]


# --------------------------------------------------------------------------------------------
# The evaluation loop


def test_oracle_model_reaches_near_perfect_mask_ap(oracle_result, examples):
    objects = _objects(examples.uri, "eval")
    assert oracle_result["num_images"] == NUM_IMAGES
    assert oracle_result["num_annotations"] == len(objects)
    assert oracle_result["num_detections"] == sum(1 for *_, crowd in objects if not crowd)
    # Measured 0.997 (one star edge case misses IoU 0.95); every threshold up to 0.75 is exact.
    assert oracle_result["segm"]["AP"] >= 0.98
    assert oracle_result["segm"]["AP50"] == 1.0
    assert oracle_result["segm"]["AP75"] == 1.0
    assert oracle_result["bbox"]["AP50"] == 1.0
    per_category = oracle_result["per_category"]
    assert set(per_category) == COCO_IDS  # True COCO ids, never contiguous indices.
    names = {c["id"]: c["name"] for c in CATEGORIES}
    with_gt = {category_id for _, category_id, crowd in objects if not crowd}
    for category_id, value in per_category.items():
        assert value["name"] == names[category_id]
        assert value["AP"] >= 0.95 if category_id in with_gt else value["AP"] == -1.0
    assert {d["category_id"] for d in oracle_result["detections"]} == with_gt
    assert set(oracle_result["timing"]) >= {"model_load", "inference", "postprocess", "total"}


def test_demo_scale_oracle_is_limited_by_quarter_resolution_masks(models, examples):
    result = _evaluate(models, examples, "demo_scale")
    # Large and medium objects survive the quarter-resolution layout; small ones (2-3 mask
    # pixels) do not. Measured: AP 0.68, APm 0.99, APl 1.0 on these six images.
    assert result["segm"]["APl"] == pytest.approx(1.0)
    assert result["segm"]["APm"] >= 0.95
    assert 0.6 <= result["segm"]["AP"] < 0.95


def test_ground_truth_given_to_cocoeval_is_exactly_the_stored_one(empty_run, examples):
    _, calls = empty_run
    images, categories, gt_annotations, _ = calls["segm"]
    stored = read_examples(examples.uri, "eval")
    assert sorted((i["id"], i["height"], i["width"]) for i in images) == sorted(
        (
            feature_values(ex, features.IMAGE_ID)[0],
            feature_values(ex, features.IMAGE_HEIGHT)[0],
            feature_values(ex, features.IMAGE_WIDTH)[0],
        )
        for ex in stored
    )
    assert {c["id"] for c in categories} == COCO_IDS
    expected = {}
    for ex in stored:
        image_id = feature_values(ex, features.IMAGE_ID)[0]
        size = [
            feature_values(ex, features.IMAGE_HEIGHT)[0],
            feature_values(ex, features.IMAGE_WIDTH)[0],
        ]
        for ann_id, category_id, rle, area, crowd in zip(
            feature_values(ex, features.OBJECT_ANNOTATION_ID),
            feature_values(ex, features.OBJECT_CATEGORY_ID),
            feature_values(ex, features.OBJECT_MASK_RLE),
            feature_values(ex, features.OBJECT_AREA),
            feature_values(ex, features.OBJECT_IS_CROWD),
        ):
            expected[ann_id] = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": {"size": size, "counts": rle.decode("ascii")},
                "area": area,
                "iscrowd": crowd,
            }
    assert any(a["iscrowd"] for a in expected.values())
    assert {a["id"]: a for a in gt_annotations} == expected


def test_model_that_detects_nothing_gives_zero_ap(empty_run):
    result, calls = empty_run
    assert result["num_detections"] == 0 and result["detections"] == []
    assert calls["segm"][3] == []
    assert result["segm"]["AP"] == 0.0
    assert result["bbox"]["AP"] == 0.0
    # 0 where the size range has ground truth, pycocotools' -1 where it has none.
    assert all(v in (0.0, -1.0) for v in [*result["segm"].values(), *result["bbox"].values()])
    assert all(v["AP"] in (0.0, -1.0) for v in result["per_category"].values())


def test_split_with_unannotated_images(models, examples, oracle_result):
    result = _evaluate(models, examples, "oracle", split="sparse")
    assert result["num_images"] == NUM_IMAGES
    assert result["num_annotations"] == len(_objects(examples.uri, "sparse"))
    assert result["num_annotations"] < oracle_result["num_annotations"]
    # The oracle still detects the removed objects: false positives on the unannotated images
    # count against it, which shows those images were registered with COCOeval.
    assert 0.0 < result["segm"]["AP"] < oracle_result["segm"]["AP"]


def test_category_ids_that_disagree_with_the_category_map_raise(models, examples):
    category_map = load_category_map(examples.uri)
    category_map[0]["coco_id"], category_map[1]["coco_id"] = (
        category_map[1]["coco_id"],
        category_map[0]["coco_id"],
    )
    with pytest.raises(ValueError, match="disagree with the category map"):
        evaluate_saved_model(
            os.path.join(models["oracle"].uri, "Format-Serving"),
            os.path.join(examples.uri, "Split-eval", "*"),
            category_map,
        )


# --------------------------------------------------------------------------------------------
# The component


def _run_component(tmp_path, examples, model, baseline=None, **params):
    evaluation = standard_artifacts.ModelEvaluation()
    evaluation.uri = str(tmp_path / "evaluation")
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(tmp_path / "blessing")
    os.makedirs(evaluation.uri)
    os.makedirs(blessing.uri)
    MaskEvaluator.test_call(
        examples=examples,
        model=model,
        evaluation=evaluation,
        blessing=blessing,
        baseline_model=baseline,
        **{"eval_split": "eval", "min_mask_ap": 0.0, "max_regression": 0.01, "batch_size": 8}
        | params,
    )
    return evaluation, blessing


def _custom_properties(artifact) -> dict:
    props = artifact.mlmd_artifact.custom_properties
    return {key: getattr(props[key], props[key].WhichOneof("value")) for key in props}


def test_component_blesses_model_above_threshold(tmp_path, examples, models, oracle_result):
    model = models["oracle"]
    evaluation, blessing = _run_component(tmp_path, examples, model, min_mask_ap=0.5)

    assert os.listdir(blessing.uri) == ["BLESSED"]
    props = _custom_properties(blessing)
    assert props["blessed"] == 1
    assert props["current_model"] == model.uri
    assert props["current_model_id"] == model.id
    assert "baseline_model" not in props and "baseline_model_id" not in props
    assert props["mask_AP"] == pytest.approx(oracle_result["segm"]["AP"])
    assert "no baseline" in props["blessing_message"]

    with open(os.path.join(evaluation.uri, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["segm"]) == set(metrics["bbox"]) == set(coco_metrics.STAT_NAMES)
    assert metrics["segm"] == pytest.approx(oracle_result["segm"])
    assert {int(k) for k in metrics["per_category"]} == COCO_IDS
    assert metrics["per_category"]["25"]["name"] == "bar"
    assert metrics["num_images"] == NUM_IMAGES and "total" in metrics["timing"]
    with open(os.path.join(evaluation.uri, "detections.json")) as f:
        detections = json.load(f)
    assert len(detections) == oracle_result["num_detections"]
    assert set(detections[0]) == {"image_id", "category_id", "segmentation", "score"}
    with open(os.path.join(evaluation.uri, "summary.txt")) as f:
        assert "Average Precision" in f.read()
    with open(os.path.join(evaluation.uri, "precision.npz"), "rb") as f:
        table = coco_metrics.PrecisionTable.from_npz(f.read())
    assert table.precision.shape == (10, 101, len(COCO_IDS), 4, 3)
    assert set(table.category_ids.tolist()) == COCO_IDS
    for k, category_id in enumerate(table.category_ids):  # The numbers per_category came from.
        column = table.precision[:, :, k, 0, -1]
        assert column[column > -1].mean() == pytest.approx(
            metrics["per_category"][str(category_id)]["AP"], abs=1e-12
        )
    eval_props = _custom_properties(evaluation)
    assert eval_props["mask_AP"] == pytest.approx(oracle_result["segm"]["AP"])
    assert eval_props["box_AP"] == pytest.approx(oracle_result["bbox"]["AP"])
    assert eval_props["mask_AP50"] == 1.0 and eval_props["num_images"] == NUM_IMAGES


def test_component_does_not_bless_below_threshold(tmp_path, examples, models):
    model = models["empty"]
    _, blessing = _run_component(tmp_path, examples, model, min_mask_ap=0.1)
    assert os.listdir(blessing.uri) == ["NOT_BLESSED"]
    props = _custom_properties(blessing)
    assert props["blessed"] == 0
    assert props["current_model_id"] == model.id
    assert props["mask_AP"] == 0.0
    assert "min_mask_ap" in props["blessing_message"]


def test_component_rejects_regression_beyond_tolerance(tmp_path, examples, models):
    model, baseline = models["noisy"], models["oracle"]
    evaluation, blessing = _run_component(
        tmp_path, examples, model, baseline, min_mask_ap=0.1, max_regression=0.05
    )
    assert os.listdir(blessing.uri) == ["NOT_BLESSED"]
    props = _custom_properties(blessing)
    assert props["blessed"] == 0
    assert props["current_model_id"] == model.id
    assert props["baseline_model"] == baseline.uri
    assert props["baseline_model_id"] == baseline.id
    assert props["mask_AP"] >= 0.1  # It passed the absolute threshold, failed the baseline.
    assert props["mask_AP"] < props["baseline_mask_AP"] - 0.05
    assert "baseline" in props["blessing_message"]
    with open(os.path.join(evaluation.uri, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["baseline"]["model_id"] == baseline.id
    assert metrics["baseline"]["segm"]["AP"] == props["baseline_mask_AP"]


def test_component_blesses_improvement_over_baseline(tmp_path, examples, models):
    model, baseline = models["oracle"], models["noisy"]
    _, blessing = _run_component(tmp_path, examples, model, baseline, min_mask_ap=0.5)
    assert os.listdir(blessing.uri) == ["BLESSED"]
    props = _custom_properties(blessing)
    assert props["blessed"] == 1
    assert (props["current_model_id"], props["baseline_model_id"]) == (model.id, baseline.id)
    assert props["mask_AP"] > props["baseline_mask_AP"]


def test_component_rejects_unknown_split(tmp_path, examples, models):
    with pytest.raises(ValueError, match="not in the examples' splits"):
        _run_component(tmp_path, examples, models["empty"], eval_split="test")


@pytest.mark.parametrize(
    "mask_ap, baseline_ap, blessed",
    [
        (0.30, None, True),
        (0.19, None, False),  # Below min_mask_ap.
        (0.30, 0.305, True),  # Within max_regression.
        (0.30, 0.32, False),  # Regressed beyond max_regression.
        (-1.0, None, False),  # No ground truth in the split: pycocotools' -1 never passes.
    ],
)
def test_blessing_decision(mask_ap, baseline_ap, blessed):
    assert blessing_decision(mask_ap, 0.2, baseline_ap, 0.01)[0] is blessed
