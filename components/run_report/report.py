"""The run report: one HTML page with PNGs that shows how a pipeline run went.

Sections, in page order:
  - headline COCO numbers (mask and box-from-mask AP) from the evaluation's `metrics.json`;
  - precision/recall curves at IoU 0.50 and 0.75: mask precision, area "all", 100 detections,
    averaged over the categories that have ground truth (`coco_metrics.PrecisionTable`);
  - per-category mask AP bars (`metrics.json`), best first; categories without ground truth in
    the split are listed as such, without a bar;
  - training curves from the Trainer's TensorBoard event files: the loss parts together, then
    one panel per other scalar (learning rate, images per second, ...);
  - for the first N images of the evaluated split, the ground truth next to the detections that
    score at least `min_score`, coloured by category (the same colour on both sides).

A section whose input is missing or empty says so; the page is always written. The functions
here know files and arrays, not TFX artifacts (see `component.py` for that), so a report can be
built from any evaluation directory, log directory and examples split.
"""

from __future__ import annotations

import dataclasses
import html
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg  # No pyplot: no display, no state.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from pycocotools import mask as mask_utils

from components.mask_evaluator.coco_metrics import STAT_NAMES, PrecisionTable
from components.mask_evaluator.runner import ground_truth_from_example
from models.preprocess import decode_image
from models.visualize import instance_color, overlay_instances
from schemas import features

TITLE = "SOLOv2 run report"
REPORT_FILENAME = "index.html"
PR_CURVES_FILENAME = "pr_curves.png"
CATEGORY_AP_FILENAME = "category_ap.png"
LOSS_CURVES_FILENAME = "loss_curves.png"
TRAINING_SCALARS_FILENAME = "training_scalars.png"
PREDICTIONS_DIRNAME = "predictions"  # predictions/<image_id>.png

PR_CURVE_IOUS = (0.5, 0.75)
PR_CURVE_AREA = "all"
PR_CURVE_MAX_DETECTIONS = 100
FIGURE_DPI = 100  # A figure of w x h inches is saved as (100 w) x (100 h) pixels.
SAMPLE_GAP = 8  # White pixels between the ground-truth and the prediction panels.
# Scalars shown first in the training panel, when logged; the others follow by name.
PREFERRED_SCALARS = ("learning_rate", "images_per_second")


# ---------------------------------------------------------------------------------------------
# Data


def mean_precision_curve(
    table: PrecisionTable,
    iou_threshold: float,
    *,
    area: str = PR_CURVE_AREA,
    max_detections: int = PR_CURVE_MAX_DETECTIONS,
) -> np.ndarray | None:
    """Precision at each recall threshold, averaged over categories: `[R]` float64.

    `table.precision[t, :, k, a, m]` is -1 for a category without ground truth ("no data"), so
    such categories are left out of the mean rather than averaged as -1. Returns None when no
    category has ground truth. The mean of the curve is COCO's AP at that IoU (AP50, AP75).
    """
    t = int(np.flatnonzero(np.isclose(table.iou_thresholds, iou_threshold))[0])
    a = table.area_ranges.index(area)
    m = int(np.flatnonzero(table.max_detections == max_detections)[0])
    precision = table.precision[t, :, :, a, m]  # [R, K]
    valid = precision > -1  # COCOeval marks whole categories, so every r has the same count.
    if not valid.any():
        return None
    return np.where(valid, precision, 0.0).sum(axis=1) / valid.sum(axis=1)


@dataclasses.dataclass(frozen=True)
class CategoryAP:
    category_id: int  # COCO id
    name: str
    ap: float | None  # mask AP@[.5:.95]; None: no ground truth in the split (COCOeval's -1)


def category_aps(metrics: Mapping[str, Any]) -> list[CategoryAP]:
    """Per-category mask AP from `metrics.json`, best first, categories without GT last."""
    rows = [
        CategoryAP(
            category_id=int(category_id),
            name=record.get("name") or str(category_id),
            ap=None if record["AP"] < 0 else float(record["AP"]),
        )
        for category_id, record in metrics.get("per_category", {}).items()
    ]
    return sorted(rows, key=lambda r: (r.ap is None, -(r.ap or 0.0), r.category_id))


@dataclasses.dataclass(frozen=True)
class ScalarSeries:
    steps: np.ndarray  # [N] int64, increasing
    values: np.ndarray  # [N] float64


def read_scalars(log_dir: str) -> dict[str, ScalarSeries]:
    """Every scalar in the TensorBoard event files under `log_dir` (searched recursively), by tag.

    Reads both TF1 `simple_value` scalars and the tensor-valued scalars that `tf.summary.scalar`
    writes in TF2 / Keras 3 (a 0-d numeric tensor). When a step was logged more than once (the
    same tag in several files), the most recent write wins. A truncated event file (a killed
    Trainer) gives what was read before the damage; a missing directory gives {}.
    """
    points: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    for path in _event_files(log_dir):
        try:
            # What tf.compat.v1.train.summary_iterator does, without its deprecated reader.
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    scalar = _scalar(value)
                    if scalar is None:
                        continue
                    by_step = points.setdefault(value.tag, {})
                    previous = by_step.get(event.step)
                    if previous is None or event.wall_time >= previous[0]:
                        by_step[event.step] = (event.wall_time, scalar)
        except tf.errors.DataLossError:
            continue
    series = {}
    for tag, by_step in points.items():
        steps = sorted(by_step)
        series[tag] = ScalarSeries(
            steps=np.asarray(steps, np.int64),
            values=np.asarray([by_step[s][1] for s in steps], np.float64),
        )
    return series


def _event_files(log_dir: str) -> list[str]:
    if not tf.io.gfile.isdir(log_dir):
        return []
    return sorted(
        os.path.join(directory, name)
        for directory, _, names in tf.io.gfile.walk(log_dir)
        for name in names
        if "tfevents" in name
    )


def _scalar(value) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        array = tf.make_ndarray(value.tensor)
        if array.size == 1 and array.dtype.kind in "fiub":  # Not text, images or histograms.
            return float(array.reshape(()))
    return None


@dataclasses.dataclass(frozen=True)
class Instances:
    """Objects drawn on one image panel (N may be 0)."""

    masks: np.ndarray  # [N, H, W] bool, at the original image size
    labels: list[str]  # [N] category names
    colors: list[tuple[int, int, int]]  # [N] RGB, by category
    scores: list[float] | None  # [N] for detections; None for ground truth


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluated image with its ground truth and its detections above the score cut."""

    image_id: int
    file_name: str
    image: np.ndarray  # [H, W, 3] uint8 RGB
    ground_truth: Instances  # in stored order
    detections: Instances  # score >= min_score, lowest first (the best is drawn on top)
    num_detections: int  # every detection of the image, including those below the cut


def read_samples(
    examples_file_pattern: str,
    detections: Sequence[Mapping[str, Any]],
    category_map: Sequence[Mapping[str, Any]],
    *,
    num_images: int,
    min_score: float,
) -> list[Sample]:
    """The first `num_images` examples of a split (in file order), with their detections.

    Args:
      examples_file_pattern: glob of the split's gzip TFRecords (CocoExampleGen's `Split-eval/*`).
      detections: COCO results (`image_id`, `category_id`, `segmentation` as compressed RLE at
        the original size, `score`), as the evaluator writes `detections.json`.
      category_map: `[{"index", "coco_id", "name"}]` records of `category_map.json`; a
        category's colour is `models.visualize.instance_color(index)`.
      min_score: detections below it are counted but not drawn.
    """
    files = sorted(tf.io.gfile.glob(examples_file_pattern))
    if not files or num_images <= 0:
        return []
    index_by_id = {int(c["coco_id"]): int(c["index"]) for c in category_map}
    name_by_id = {int(c["coco_id"]): str(c["name"]) for c in category_map}
    detections_by_image: dict[int, list[Mapping[str, Any]]] = {}
    for detection in detections:
        detections_by_image.setdefault(int(detection["image_id"]), []).append(detection)

    def instances(objects, rles, suffixes, scores, height, width) -> Instances:
        category_ids = [int(o["category_id"]) for o in objects]
        return Instances(
            masks=_decode_masks(rles, height, width),
            labels=[name_by_id.get(c, str(c)) + s for c, s in zip(category_ids, suffixes)],
            colors=[instance_color(index_by_id.get(c, c)) for c in category_ids],
            scores=scores,
        )

    samples = []
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP").take(num_images):
        example = tf.train.Example.FromString(serialized.numpy())
        image_id, height, width, annotations = ground_truth_from_example(example)
        feature = example.features.feature
        all_detections = detections_by_image.get(int(image_id), [])
        # Lowest score first: overlay_instances draws later instances on top.
        shown = sorted(
            (d for d in all_detections if d["score"] >= min_score), key=lambda d: d["score"]
        )
        samples.append(
            Sample(
                image_id=int(image_id),
                file_name=feature[features.IMAGE_FILENAME].bytes_list.value[0].decode("utf-8"),
                image=decode_image(feature[features.IMAGE_ENCODED].bytes_list.value[0]).numpy(),
                ground_truth=instances(
                    annotations,
                    [a["rle"] for a in annotations],
                    [" (crowd)" if a["iscrowd"] else "" for a in annotations],
                    None,
                    height,
                    width,
                ),
                detections=instances(
                    shown,
                    [d["segmentation"] for d in shown],
                    [""] * len(shown),
                    [float(d["score"]) for d in shown],
                    height,
                    width,
                ),
                num_detections=len(all_detections),
            )
        )
    return samples


def _decode_masks(rles: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
    """Compressed RLEs (counts bytes or str) -> `[N, height, width]` bool."""
    masks = np.zeros((len(rles), height, width), bool)
    for i, rle in enumerate(rles):
        counts = rle["counts"]
        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        masks[i] = mask_utils.decode({"size": [height, width], "counts": counts}) != 0
    return masks


# ---------------------------------------------------------------------------------------------
# Pictures


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    return figure


def plot_pr_curves(table: PrecisionTable) -> Figure | None:
    """Mean precision vs recall, one line per IoU of `PR_CURVE_IOUS`; None without ground truth."""
    curves = {iou: mean_precision_curve(table, iou) for iou in PR_CURVE_IOUS}
    if all(curve is None for curve in curves.values()):
        return None
    figure = _figure(6.0, 4.5)
    axes = figure.add_subplot()
    for iou, curve in curves.items():
        axes.plot(
            table.recall_thresholds,
            curve,
            label=f"IoU {iou:.2f} (AP {curve.mean():.3f})",
            linewidth=2,
        )
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    axes.set_title(
        f"Mask precision/recall, mean over categories (area {PR_CURVE_AREA}, "
        f"{PR_CURVE_MAX_DETECTIONS} detections)",
        fontsize=9,
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def plot_category_ap(rows: Sequence[CategoryAP]) -> Figure | None:
    """Horizontal bars, one per category, top to bottom in `rows` order; None for no rows."""
    if not rows:
        return None
    figure = _figure(7.0, 1.2 + 0.28 * len(rows))
    axes = figure.add_subplot()
    positions = np.arange(len(rows))[::-1]  # First row on top.
    widths = [row.ap or 0.0 for row in rows]
    axes.barh(positions, widths, color="#4c72b0", height=0.7)
    axes.set_yticks(positions, [row.name for row in rows])
    for position, row in zip(positions, rows):
        text = "no ground truth" if row.ap is None else f"{row.ap:.3f}"
        axes.text((row.ap or 0.0) + 0.01, position, text, va="center", fontsize=8)
    axes.set(xlim=(0, 1.1), xlabel="mask AP@[.50:.95]")
    axes.set_title("Per-category mask AP (eval split)", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def _is_loss(tag: str) -> bool:
    return tag.endswith("loss")


def plot_loss_curves(scalars: Mapping[str, ScalarSeries]) -> Figure | None:
    """Every `*loss` scalar against the step, on one axis; None when none was logged."""
    losses = sorted(tag for tag in scalars if _is_loss(tag))
    if not losses:
        return None
    figure = _figure(7.0, 4.5)
    axes = figure.add_subplot()
    for tag in losses:
        axes.plot(scalars[tag].steps, scalars[tag].values, marker=".", label=tag)
    axes.set(xlabel="step", ylabel="loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Training losses", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_training_scalars(scalars: Mapping[str, ScalarSeries]) -> Figure | None:
    """One small panel per non-loss scalar (learning rate, images/s, ...); None for none."""
    others = [tag for tag in scalars if not _is_loss(tag)]
    tags = [t for t in PREFERRED_SCALARS if t in others]
    tags += sorted(t for t in others if t not in PREFERRED_SCALARS)
    if not tags:
        return None
    columns = min(3, len(tags))
    rows = -(-len(tags) // columns)
    figure = _figure(4.0 * columns, 3.0 * rows)
    for i, tag in enumerate(tags):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.plot(scalars[tag].steps, scalars[tag].values, marker=".")
        axes.set_title(tag, fontsize=10)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def render_sample(sample: Sample) -> np.ndarray:
    """Ground truth (left) and detections (right): `[H, 2 W + SAMPLE_GAP, 3]` uint8."""
    panels = [
        overlay_instances(
            sample.image,
            instances.masks,
            instances.labels,
            instances.scores,
            colors=instances.colors,
        )
        for instances in (sample.ground_truth, sample.detections)
    ]
    gap = np.full((sample.image.shape[0], SAMPLE_GAP, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=1)


def _write_bytes(path: str, data: bytes) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


def _save_figure(figure: Figure, path: str) -> None:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=FIGURE_DPI)
    _write_bytes(path, out.getvalue())


def _save_picture(picture: np.ndarray, path: str) -> None:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    _write_bytes(path, out.getvalue())


# ---------------------------------------------------------------------------------------------
# The page


def write_report(
    output_dir: str,
    *,
    metrics: Mapping[str, Any] | None,
    precision: PrecisionTable | None,
    scalars: Mapping[str, ScalarSeries],
    samples: Sequence[Sample],
    min_score: float,
    sources: Mapping[str, str] | None = None,
) -> str:
    """Writes `index.html` and its PNGs into `output_dir`; returns the path of `index.html`.

    Args:
      metrics: the evaluation's `metrics.json`, or None when absent.
      precision: the evaluation's accumulated mask precision, or None when absent.
      scalars: `read_scalars` of the Trainer's logs ({} when none).
      samples: `read_samples` of the evaluated split ([] when none).
      min_score: the score cut the samples were read with (shown in the captions).
      sources: label -> path/URI of the inputs, listed at the bottom of the page.
    """
    body = [f"<h1>{html.escape(TITLE)}</h1>"]
    body += _headline_section(metrics)

    body.append("<h2>Precision / recall</h2>")
    figure = None if precision is None else plot_pr_curves(precision)
    if precision is None:
        body.append(_missing("The evaluation holds no accumulated precision (precision.npz)."))
    elif figure is None:
        body.append(_missing("No category has ground truth in the evaluated split."))
    else:
        _save_figure(figure, os.path.join(output_dir, PR_CURVES_FILENAME))
        body.append(_img(PR_CURVES_FILENAME, "precision/recall curves at IoU 0.50 and 0.75"))

    body.append("<h2>Per-category mask AP</h2>")
    figure = plot_category_ap(category_aps(metrics or {}))
    if figure is None:
        body.append(_missing("The evaluation holds no per-category AP (metrics.json)."))
    else:
        _save_figure(figure, os.path.join(output_dir, CATEGORY_AP_FILENAME))
        body.append(_img(CATEGORY_AP_FILENAME, "per-category mask AP"))

    body.append("<h2>Training</h2>")
    written = False
    for plot, filename, alt in (
        (plot_loss_curves, LOSS_CURVES_FILENAME, "training losses"),
        (plot_training_scalars, TRAINING_SCALARS_FILENAME, "learning rate and other scalars"),
    ):
        figure = plot(scalars)
        if figure is not None:
            _save_figure(figure, os.path.join(output_dir, filename))
            body.append(_img(filename, alt))
            written = True
    if not written:
        body.append(_missing("No TensorBoard scalars were found in the Trainer's logs."))

    body.append("<h2>Predictions on eval images</h2>")
    if not samples:
        body.append(_missing("No eval images to show."))
    else:
        body.append(
            "<p>Left: ground truth. Right: detections with score &ge; "
            f"{min_score:g}. Colours are by category, the same on both sides.</p>"
        )
        body.append('<div class="grid">')
        for sample in samples:
            filename = f"{PREDICTIONS_DIRNAME}/{sample.image_id}.png"
            _save_picture(render_sample(sample), os.path.join(output_dir, filename))
            caption = (
                f"image {sample.image_id} ({sample.file_name}): "
                f"{len(sample.ground_truth.labels)} ground-truth objects, "
                f"{len(sample.detections.labels)} of {sample.num_detections} detections shown"
            )
            body.append(
                f"<figure>{_img(filename, caption)}"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        body.append("</div>")

    if sources:
        body.append("<h2>Inputs</h2><ul>")
        body += [
            f"<li>{html.escape(label)}: <code>{html.escape(path)}</code></li>"
            for label, path in sources.items()
        ]
        body.append("</ul>")

    path = os.path.join(output_dir, REPORT_FILENAME)
    _write_bytes(path, _page(TITLE, body).encode("utf-8"))
    return path


def _headline_section(metrics: Mapping[str, Any] | None) -> list[str]:
    if not metrics:
        return [_missing("No metrics.json in the evaluation.")]
    header = "".join(f"<th>{name}</th>" for name in STAT_NAMES)
    rows = "".join(
        f"<tr><th>{label}</th>"
        + "".join(f"<td>{_stat(metrics[key].get(name))}</td>" for name in STAT_NAMES)
        + "</tr>"
        for label, key in (("mask", "segm"), ("box from mask", "bbox"))
        if key in metrics
    )
    counts = ", ".join(
        f"{metrics[key]} {label}"
        for key, label in (
            ("num_images", "images"),
            ("num_annotations", "annotations"),
            ("num_detections", "detections"),
        )
        if key in metrics
    )
    lines = [
        f"<p>Model <code>{html.escape(str(metrics.get('model', '?')))}</code>, evaluated on split "
        f"<code>{html.escape(str(metrics.get('split', '?')))}</code>: {counts}.</p>",
        f'<table class="stats"><tr><th></th>{header}</tr>{rows}</table>',
        "<p>-1: no ground truth for that area range (COCOeval's marker).</p>",
    ]
    return lines


def _stat(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
img { max-width: 100%; }
.missing { color: #a33; font-style: italic; }
.stats td, .stats th { padding: 0.2em 0.6em; text-align: right; border-bottom: 1px solid #eee; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _page(title: str, body: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
