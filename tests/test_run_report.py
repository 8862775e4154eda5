"""RunReport: the per-run visual report, built from real inputs.

- examples: the real CocoExampleGen executor on a small demo dataset;
- evaluations: the real MaskEvaluator on SavedModels with known answers (`tests/oracle_model.py`:
  an oracle that finds half the objects, and a model that finds nothing);
- training logs: TensorBoard event files written by `tf.summary` (and one TF1-style event);
- the precision/recall arithmetic: COCOeval on small synthetic masks, checked against a direct
  computation from the precision array.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from tfx.types import standard_artifacts

from components.mask_evaluator.coco_metrics import CocoMaskEvaluator, PrecisionTable
from components.mask_evaluator.component import (
    DETECTIONS_FILENAME,
    METRICS_FILENAME,
    PRECISION_FILENAME,
    MaskEvaluator,
)
from components.mask_evaluator.runner import ground_truth_from_example, load_category_map
from components.run_report import report as run_report
from components.run_report.component import REPORT_HTML_PROPERTY, RunReport, VisualReport
from models.visualize import instance_color, overlay_instances
from pipeline.demo_data import CATEGORIES, generate_demo_dataset
from tests.example_gen_utils import read_examples, run_example_gen
from tests.oracle_model import export_empty_model, export_oracle_model

NUM_IMAGES = 4
# Trainer tags (models/train.py) written per logged step.
LOSS_TAGS = ("category_loss", "mask_loss", "total_loss")
OTHER_TAGS = ("learning_rate", "images_per_second", "grad_norm", "num_positives")


# --------------------------------------------------------------------------------------------
# Fixtures: real examples, evaluations and event files


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> standard_artifacts.Examples:
    root = tmp_path_factory.mktemp("report_data")
    generate_demo_dataset(root, num_train=0, num_val=NUM_IMAGES)
    return run_example_gen(
        str(root),
        str(tmp_path_factory.mktemp("report_examples")),
        split_files={"eval": "annotations/instances_val.json"},
    )


def _evaluate(root, examples, export) -> standard_artifacts.ModelEvaluation:
    """Runs the real MaskEvaluator on the model `export(dir)` saves; returns its evaluation."""
    model = standard_artifacts.Model()
    model.uri = str(root / "model")
    model.id = 1
    export(os.path.join(model.uri, "Format-Serving"))
    evaluation = standard_artifacts.ModelEvaluation()
    evaluation.uri = str(root / "evaluation")
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(root / "blessing")
    MaskEvaluator.test_call(
        examples=examples,
        model=model,
        evaluation=evaluation,
        blessing=blessing,
        baseline_model=None,
        eval_split="eval",
        min_mask_ap=0.0,
        max_regression=0.01,
        batch_size=8,
    )
    return evaluation


@pytest.fixture(scope="module")
def half_evaluation(examples, tmp_path_factory) -> standard_artifacts.ModelEvaluation:
    """An oracle that returns every second object (scores 0.99, 0.98, ... per image)."""
    eval_examples = read_examples(examples.uri, "eval")
    return _evaluate(
        tmp_path_factory.mktemp("half"),
        examples,
        lambda d: export_oracle_model(eval_examples, d, keep_every=2),
    )


@pytest.fixture(scope="module")
def empty_evaluation(examples, tmp_path_factory) -> standard_artifacts.ModelEvaluation:
    return _evaluate(tmp_path_factory.mktemp("empty"), examples, export_empty_model)


def _write_tf1_scalar(path: str, tag: str, step: int, value: float) -> None:
    """A TF1-style event (`simple_value`), as tf.compat.v1 summaries and older tools write."""
    summary = tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag=tag, simple_value=value)])
    event = tf.compat.v1.Event(wall_time=time.time(), step=step, summary=summary)
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(event.SerializeToString())


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> str:
    """A model_run directory as the Trainer leaves it (`train/` event files), plus extras.

    Steps 10..40 from a first writer; a second writer (a later file) logs step 40 again with
    total_loss 99 and adds step 50; a text summary; a TF1 `simple_value` scalar.
    """
    root = tmp_path_factory.mktemp("model_run")
    train = str(root / "train")
    first = tf.summary.create_file_writer(train)
    with first.as_default():
        for step in (10, 20, 30, 40):
            for i, tag in enumerate(LOSS_TAGS + OTHER_TAGS):
                tf.summary.scalar(tag, (i + 1) / step, step=step)
            tf.summary.text("note", "not a scalar", step=step)
    first.close()
    time.sleep(0.01)
    second = tf.summary.create_file_writer(train, filename_suffix=".resumed")
    with second.as_default():
        tf.summary.scalar("total_loss", 99.0, step=40)
        for i, tag in enumerate(LOSS_TAGS + OTHER_TAGS):
            tf.summary.scalar(tag, (i + 1) / 50, step=50)
    second.close()
    _write_tf1_scalar(os.path.join(root, "events.out.tfevents.0.tf1"), "tf1_loss", 7, 0.5)
    return str(root)


def _run_report(root, examples, evaluation, log_dir, **params) -> VisualReport:
    model_run = standard_artifacts.ModelRun()
    model_run.uri = log_dir
    report = VisualReport()
    report.uri = str(root / "report")
    os.makedirs(report.uri)
    RunReport.test_call(
        evaluation=evaluation,
        model_run=model_run,
        examples=examples,
        report=report,
        **{"num_images": 8, "min_score": 0.3} | params,
    )
    return report


def _referenced_and_written_pngs(report_dir: str) -> tuple[set[str], set[str]]:
    with open(os.path.join(report_dir, run_report.REPORT_FILENAME)) as f:
        page = f.read()
    referenced = set(re.findall(r'<img src="([^"]+)"', page))
    written = {
        os.path.relpath(os.path.join(directory, name), report_dir)
        for directory, _, names in os.walk(report_dir)
        for name in names
        if name.endswith(".png")
    }
    return referenced, written


def _png_size(path: str) -> tuple[int, int]:
    """(width, height) of a PNG, after checking that it decodes."""
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


def _figure_pixels(figure) -> tuple[int, int]:
    width, height = figure.get_size_inches() * run_report.FIGURE_DPI
    return round(width), round(height)


# --------------------------------------------------------------------------------------------
# Precision/recall curves


def _box(y0, y1, x0, x1, size=40):
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


@pytest.fixture(scope="module")
def synthetic_result() -> dict:
    """COCOeval on one 40x40 image: categories 1 and 2 have ground truth, 3 only a false alarm.

    Category 1: an exact match (0.9), a false alarm (0.8), a match at IoU 0.54 (0.7): recall 1
    at IoU 0.5, 0.5 at IoU 0.75. Category 2: one match at IoU 0.9.
    """
    evaluator = CocoMaskEvaluator(
        categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    )
    gt = [(1, _box(0, 10, 0, 10)), (1, _box(20, 30, 20, 30)), (2, _box(0, 20, 20, 40))]
    evaluator.add_ground_truth(
        1,
        40,
        40,
        [
            {
                "category_id": c,
                "rle": mask_utils.encode(np.asfortranarray(m)),
                "area": float(m.sum()),
                "iscrowd": 0,
            }
            for c, m in gt
        ],
    )
    detections = [
        (1, 0.9, _box(0, 10, 0, 10)),
        (1, 0.8, _box(30, 40, 0, 10)),
        (1, 0.7, _box(20, 30, 23, 33)),
        (2, 0.6, _box(0, 20, 22, 40)),
        (3, 0.5, _box(30, 40, 30, 40)),
    ]
    evaluator.add_detections(
        1, [{"category_id": c, "score": s, "mask": m} for c, s, m in detections]
    )
    return evaluator.evaluate()


def _direct_mean_curve(table: PrecisionTable, iou: float) -> np.ndarray:
    """Mean over categories of precision[t, r, k, all, 100], skipping -1, one r at a time."""
    t = [i for i, v in enumerate(table.iou_thresholds) if abs(v - iou) < 1e-9][0]
    a = list(table.area_ranges).index("all")
    m = list(table.max_detections).index(100)
    curve = []
    for r in range(len(table.recall_thresholds)):
        values = [
            table.precision[t, r, k, a, m]
            for k in range(len(table.category_ids))
            if table.precision[t, r, k, a, m] != -1
        ]
        curve.append(sum(values) / len(values))
    return np.array(curve)


def test_pr_curve_is_the_mean_over_categories_with_ground_truth(synthetic_result):
    table = synthetic_result["precision"]
    assert table.precision.shape == (10, 101, 3, 4, 3)
    assert list(table.category_ids) == [1, 2, 3]
    assert (table.precision[:, :, 2] == -1).all()  # Category 3 has no ground truth.

    for iou, stat in ((0.5, "AP50"), (0.75, "AP75")):
        curve = run_report.mean_precision_curve(table, iou)
        np.testing.assert_allclose(curve, _direct_mean_curve(table, iou), rtol=0, atol=1e-15)
        # Its mean is COCO's own AP at that IoU.
        assert curve.mean() == pytest.approx(synthetic_result["segm"][stat], abs=1e-12)
        # Averaging the -1 column in would have been visibly wrong.
        naive = table.precision[list(table.iou_thresholds).index(iou), :, :, 0, 2].mean(axis=1)
        assert np.abs(naive - curve).max() > 0.3
    at_50 = run_report.mean_precision_curve(table, 0.5)
    at_75 = run_report.mean_precision_curve(table, 0.75)
    # At recall 1: category 1 has precision 2/3 at IoU 0.5 and never gets there at 0.75;
    # category 2 has precision 1 at both (pycocotools' 1 - 2**-52 for a lone true positive).
    assert at_50[-1] == pytest.approx((2 / 3 + 1) / 2, abs=1e-12)
    assert at_75[-1] == pytest.approx((0 + 1) / 2, abs=1e-12)

    figure = run_report.plot_pr_curves(table)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2
    for line, curve in zip(lines, (at_50, at_75)):
        np.testing.assert_array_equal(line.get_xdata(), table.recall_thresholds)
        np.testing.assert_array_equal(line.get_ydata(), curve)


def test_no_ground_truth_gives_no_curve():
    evaluator = CocoMaskEvaluator(categories=[{"id": 1, "name": "a"}])
    evaluator.add_ground_truth(1, 40, 40, [])
    evaluator.add_detections(1, [{"category_id": 1, "score": 0.5, "mask": _box(0, 5, 0, 5)}])
    table = evaluator.evaluate()["precision"]
    assert (table.precision == -1).all()
    assert run_report.mean_precision_curve(table, 0.5) is None
    assert run_report.plot_pr_curves(table) is None


def test_precision_table_round_trips_through_npz(synthetic_result):
    table = synthetic_result["precision"]
    loaded = PrecisionTable.from_npz(table.to_npz())
    np.testing.assert_array_equal(loaded.precision, table.precision)
    np.testing.assert_array_equal(loaded.iou_thresholds, table.iou_thresholds)
    np.testing.assert_array_equal(loaded.recall_thresholds, table.recall_thresholds)
    np.testing.assert_array_equal(loaded.category_ids, table.category_ids)
    np.testing.assert_array_equal(loaded.max_detections, table.max_detections)
    assert loaded.area_ranges == table.area_ranges == ("all", "small", "medium", "large")


def test_the_saved_precision_is_what_the_evaluator_scored(half_evaluation):
    """precision.npz agrees with metrics.json: per-category AP and AP50/AP75."""
    with open(os.path.join(half_evaluation.uri, PRECISION_FILENAME), "rb") as f:
        table = PrecisionTable.from_npz(f.read())
    with open(os.path.join(half_evaluation.uri, METRICS_FILENAME)) as f:
        metrics = json.load(f)
    assert sorted(table.category_ids) == sorted(c["id"] for c in CATEGORIES)
    for k, category_id in enumerate(table.category_ids):
        column = table.precision[:, :, k, 0, -1]
        expected = metrics["per_category"][str(category_id)]["AP"]
        assert (column[column > -1].mean() if (column > -1).any() else -1.0) == pytest.approx(
            expected, abs=1e-12
        )
    for iou, stat in ((0.5, "AP50"), (0.75, "AP75")):
        curve = run_report.mean_precision_curve(table, iou)
        assert curve.mean() == pytest.approx(metrics["segm"][stat], abs=1e-12)


# --------------------------------------------------------------------------------------------
# Per-category AP bars


def test_category_ap_bars_show_each_value_under_its_name():
    metrics = {
        "per_category": {
            "3": {"name": "cat", "AP": 0.25},
            "17": {"name": "dog", "AP": -1.0},
            "90": {"name": "toy", "AP": 0.5},
            "5": {"name": None, "AP": 0.0},
        }
    }
    rows = run_report.category_aps(metrics)
    assert [(r.category_id, r.name, r.ap) for r in rows] == [
        (90, "toy", 0.5),
        (3, "cat", 0.25),
        (5, "5", 0.0),
        (17, "dog", None),
    ]
    axes = run_report.plot_category_ap(rows).axes[0]
    # Bars top to bottom, with the tick label at each bar's height.
    labels = {
        tick: text.get_text() for tick, text in zip(axes.get_yticks(), axes.get_yticklabels())
    }
    bars = sorted(axes.patches, key=lambda p: -p.get_y())
    shown = [(labels[round(p.get_y() + p.get_height() / 2)], p.get_width()) for p in bars]
    assert shown == [("toy", 0.5), ("cat", 0.25), ("5", 0.0), ("dog", 0.0)]
    notes = [t.get_text() for t in sorted(axes.texts, key=lambda t: -t.get_position()[1])]
    assert notes == ["0.500", "0.250", "0.000", "no ground truth"]
    assert run_report.plot_category_ap([]) is None


# --------------------------------------------------------------------------------------------
# Training curves


def test_scalars_are_read_from_tensor_and_simple_value_events(log_dir):
    scalars = run_report.read_scalars(log_dir)
    assert set(scalars) == {*LOSS_TAGS, *OTHER_TAGS, "tf1_loss"}  # Not the text summary.
    total = scalars["total_loss"]
    np.testing.assert_array_equal(total.steps, [10, 20, 30, 40, 50])
    # float32 as tf.summary stores it; step 40 comes from the later file.
    expected = np.float32([3 / 10, 3 / 20, 3 / 30, 99.0, 3 / 50]).astype(np.float64)
    np.testing.assert_array_equal(total.values, expected)
    assert scalars["tf1_loss"].steps.tolist() == [7] and scalars["tf1_loss"].values.tolist() == [
        0.5
    ]

    figure = run_report.plot_loss_curves(scalars)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {*LOSS_TAGS, "tf1_loss"}
    np.testing.assert_array_equal(lines["total_loss"].get_ydata(), total.values)
    panels = [axes.get_title() for axes in run_report.plot_training_scalars(scalars).axes]
    assert panels == ["learning_rate", "images_per_second", "grad_norm", "num_positives"]


def test_missing_and_truncated_logs_do_not_fail(log_dir, tmp_path):
    assert run_report.read_scalars(str(tmp_path / "absent")) == {}
    source = next(
        os.path.join(d, n) for d, _, ns in os.walk(log_dir) for n in ns if n.endswith(".resumed")
    )
    with open(source, "rb") as f:
        data = f.read()
    (tmp_path / "cut").mkdir()
    with open(tmp_path / "cut" / "events.out.tfevents.1.cut", "wb") as f:
        f.write(data[:-5])  # The last record is damaged.
    scalars = run_report.read_scalars(str(tmp_path / "cut"))
    assert scalars["total_loss"].values[0] == 99.0  # What was read before the damage is kept.
    assert run_report.plot_loss_curves({}) is None
    assert run_report.plot_training_scalars({}) is None


# --------------------------------------------------------------------------------------------
# Predictions next to ground truth


def test_samples_hold_the_stored_ground_truth_and_the_detections_above_the_cut(
    examples, half_evaluation
):
    with open(os.path.join(half_evaluation.uri, DETECTIONS_FILENAME)) as f:
        detections = json.load(f)
    category_map = load_category_map(examples.uri)
    index_by_id = {c["coco_id"]: c["index"] for c in category_map}
    name_by_id = {c["coco_id"]: c["name"] for c in category_map}
    min_score = 0.975  # The oracle scores 0.99, 0.98, 0.97, ... per image: two are drawn.
    samples = run_report.read_samples(
        os.path.join(examples.uri, "Split-eval", "*"),
        detections,
        category_map,
        num_images=3,
        min_score=min_score,
    )
    assert len(samples) == 3
    cut = 0
    for sample, example in zip(samples, read_examples(examples.uri, "eval")):
        image_id, height, width, annotations = ground_truth_from_example(example)
        assert sample.image_id == image_id and sample.image.shape == (height, width, 3)
        gt = sample.ground_truth
        assert gt.masks.shape == (len(annotations), height, width) and gt.scores is None
        for mask, annotation in zip(gt.masks, annotations):
            np.testing.assert_array_equal(mask, mask_utils.decode(annotation["rle"]) == 1)
        assert gt.labels == [
            name_by_id[a["category_id"]] + (" (crowd)" if a["iscrowd"] else "") for a in annotations
        ]
        assert gt.colors == [instance_color(index_by_id[a["category_id"]]) for a in annotations]

        of_image = [d for d in detections if d["image_id"] == image_id]
        drawn = sorted((d for d in of_image if d["score"] >= min_score), key=lambda d: d["score"])
        assert sample.num_detections == len(of_image) and len(drawn) == min(2, len(of_image))
        cut += len(of_image) - len(drawn)
        assert sample.detections.scores == [d["score"] for d in drawn]
        assert sample.detections.labels == [name_by_id[d["category_id"]] for d in drawn]
        for mask, detection in zip(sample.detections.masks, drawn):
            rle = dict(
                detection["segmentation"], counts=detection["segmentation"]["counts"].encode()
            )
            np.testing.assert_array_equal(mask, mask_utils.decode(rle) == 1)

        picture = run_report.render_sample(sample)
        assert picture.shape == (height, 2 * width + run_report.SAMPLE_GAP, 3)
        left = overlay_instances(sample.image, gt.masks, gt.labels, colors=gt.colors)
        right = overlay_instances(
            sample.image,
            sample.detections.masks,
            sample.detections.labels,
            sample.detections.scores,
            colors=sample.detections.colors,
        )
        np.testing.assert_array_equal(picture[:, :width], left)
        np.testing.assert_array_equal(picture[:, -width:], right)
        assert (picture[:, width:-width] == 255).all()
        assert not np.array_equal(left, sample.image)  # Something was drawn.
    assert cut > 0  # Some detections were left out by the score cut.


# --------------------------------------------------------------------------------------------
# The component: the whole page


def test_report_references_every_png_it_writes(tmp_path, examples, half_evaluation, log_dir):
    report = _run_report(tmp_path, examples, half_evaluation, log_dir)
    index = report.get_string_custom_property(REPORT_HTML_PROPERTY)
    assert index == os.path.join(report.uri, run_report.REPORT_FILENAME) and os.path.isabs(index)

    referenced, written = _referenced_and_written_pngs(report.uri)
    assert referenced == written
    figures = {
        run_report.PR_CURVES_FILENAME,
        run_report.CATEGORY_AP_FILENAME,
        run_report.LOSS_CURVES_FILENAME,
        run_report.TRAINING_SCALARS_FILENAME,
    }
    predictions = written - figures
    assert figures <= written and len(predictions) == NUM_IMAGES  # num_images 8 > 4 images

    for example in read_examples(examples.uri, "eval"):
        image_id, height, width, _ = ground_truth_from_example(example)
        path = os.path.join(report.uri, run_report.PREDICTIONS_DIRNAME, f"{image_id}.png")
        assert _png_size(path) == (2 * width + run_report.SAMPLE_GAP, height)
    with open(os.path.join(half_evaluation.uri, PRECISION_FILENAME), "rb") as f:
        table = PrecisionTable.from_npz(f.read())
    with open(os.path.join(half_evaluation.uri, METRICS_FILENAME)) as f:
        metrics = json.load(f)
    scalars = run_report.read_scalars(log_dir)
    for filename, figure in (
        (run_report.PR_CURVES_FILENAME, run_report.plot_pr_curves(table)),
        (
            run_report.CATEGORY_AP_FILENAME,
            run_report.plot_category_ap(run_report.category_aps(metrics)),
        ),
        (run_report.LOSS_CURVES_FILENAME, run_report.plot_loss_curves(scalars)),
        (run_report.TRAINING_SCALARS_FILENAME, run_report.plot_training_scalars(scalars)),
    ):
        assert _png_size(os.path.join(report.uri, filename)) == _figure_pixels(figure), filename

    with open(index) as f:
        page = f.read()
    assert 'class="missing"' not in page
    assert (
        f"{metrics['segm']['AP']:.3f}" in page and half_evaluation.uri in page and log_dir in page
    )


def test_no_detections_no_logs_and_an_older_evaluation_leave_notes(
    tmp_path, examples, empty_evaluation
):
    # An evaluation written before precision.npz existed, from a model that detected nothing.
    evaluation = standard_artifacts.ModelEvaluation()
    evaluation.uri = str(tmp_path / "old_evaluation")
    shutil.copytree(empty_evaluation.uri, evaluation.uri)
    os.remove(os.path.join(evaluation.uri, PRECISION_FILENAME))
    with open(os.path.join(evaluation.uri, DETECTIONS_FILENAME)) as f:
        assert json.load(f) == []

    report = _run_report(tmp_path, examples, evaluation, str(tmp_path / "no_logs"), num_images=2)
    with open(report.get_string_custom_property(REPORT_HTML_PROPERTY)) as f:
        page = f.read()
    assert "no accumulated precision" in page
    assert "No TensorBoard scalars" in page
    assert "0 of 0 detections shown" in page
    referenced, written = _referenced_and_written_pngs(report.uri)
    predictions = {p for p in written if p.startswith(run_report.PREDICTIONS_DIRNAME + "/")}
    assert referenced == written == {run_report.CATEGORY_AP_FILENAME} | predictions
    assert len(predictions) == 2
    # The prediction panel is the bare image.
    example = read_examples(examples.uri, "eval")[0]
    image_id, height, width, _ = ground_truth_from_example(example)
    with Image.open(os.path.join(report.uri, "predictions", f"{image_id}.png")) as image:
        picture = np.asarray(image)
    sample = run_report.read_samples(
        os.path.join(examples.uri, "Split-eval", "*"),
        [],
        load_category_map(examples.uri),
        num_images=1,
        min_score=0.3,
    )[0]
    np.testing.assert_array_equal(picture[:, -width:], sample.image)


def test_a_page_with_nothing_to_show_still_renders(tmp_path):
    path = run_report.write_report(
        str(tmp_path / "report"),
        metrics=None,
        precision=None,
        scalars={},
        samples=[],
        min_score=0.3,
    )
    with open(path) as f:
        page = f.read()
    assert "<img" not in page and page.count('class="missing"') == 5
    assert os.listdir(tmp_path / "report") == [run_report.REPORT_FILENAME]
