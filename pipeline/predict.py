"""`solov2 predict`: an exported SavedModel on image files -> overlay PNGs and COCO results.

The model is used only through the `serving_bytes` signature of `docs/CONTRACT.md`, exactly as
TF Serving returns it: the raw file bytes go in, and each image's masks are mapped back onto the
original image with `models.postprocess.paste_masks`, the one mapping shared with the evaluator.
Images are decoded with `models.preprocess.decode_image`, the decoder inside the signature, so
a file is skipped (with its reason) before it can fail a batch, and the overlay is drawn on the
very pixels the model saw.

Outputs in the output folder:
  <stem>.png         the original image at its size, with the detections whose score is at
                     least the threshold drawn by `models.visualize.overlay_instances`;
  coco_results.json  every detection (no threshold, as COCO evaluation expects) in COCO results
                     format: {"image_id", "category_id" (original COCO id), "segmentation"
                     (compressed RLE, counts str), "score", "bbox" [x, y, w, h] of the mask};
  images.json        [{"id", "file_name", "height", "width"}] of the predicted images.

`COCO.loadRes` accepts coco_results.json as it is. For mask AP, drop "bbox" first (as detectron2
does): with a "bbox" key, loadRes takes the box area, not the mask area, for the S/M/L split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from models.export import SIGNATURE_BYTES
from models.postprocess import paste_masks
from models.preprocess import decode_image
from models.visualize import instance_color, overlay_instances

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SAVED_MODEL_FILE = "saved_model.pb"
RESULTS_FILE = "coco_results.json"
IMAGES_FILE = "images.json"
# Masks pasted per call: paste_masks holds K float32 masks at the padded input size.
PASTE_CHUNK = 16


class PredictError(Exception):
    """A user-facing error: bad model folder, bad annotations, nothing to predict."""


@dataclasses.dataclass
class _Image:
    """One readable input: its bytes, decoded `[H, W, 3]` uint8 RGB pixels and COCO record."""

    encoded: bytes
    pixels: np.ndarray
    record: dict[str, Any]  # {"id", "file_name", "height", "width"}
    overlay_name: str


def resolve_saved_model(model_dir: str) -> str:
    """The SavedModel folder to load for `--model`.

    Accepts a SavedModel folder (it holds `saved_model.pb`), or a Pusher output root / TF
    Serving model base path: numeric version folders, of which the highest that holds a
    SavedModel is taken.
    """
    if not os.path.isdir(model_dir):
        raise PredictError(f"model folder {model_dir} does not exist")
    if os.path.isfile(os.path.join(model_dir, SAVED_MODEL_FILE)):
        return model_dir
    versions = [
        int(name)
        for name in os.listdir(model_dir)
        if name.isdigit() and os.path.isfile(os.path.join(model_dir, name, SAVED_MODEL_FILE))
    ]
    if not versions:
        raise PredictError(
            f"no SavedModel in {model_dir}: expected {SAVED_MODEL_FILE} there, or numeric "
            "version folders holding one (the Pusher's serving/solov2/<version>/)"
        )
    return os.path.join(model_dir, str(max(versions)))


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Files as given; folders become their .jpg/.jpeg/.png files, sorted. Duplicates dropped."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                sorted(
                    os.path.join(path, name)
                    for name in os.listdir(path)
                    if name.lower().endswith(IMAGE_SUFFIXES)
                    and os.path.isfile(os.path.join(path, name))
                )
            )
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def _annotation_records(annotations_file: str) -> dict[str, dict[str, Any]]:
    """COCO annotation JSON -> {file base name: its "images" record}."""
    try:
        with open(annotations_file) as f:
            images = json.load(f)["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PredictError(f"cannot read the images of {annotations_file}: {e!r}") from e
    records: dict[str, dict[str, Any]] = {}
    for image in images:
        name = os.path.basename(image["file_name"])
        if name in records:
            raise PredictError(f"{annotations_file}: two images are named {name}")
        records[name] = image
    return records


def _read_images(
    files: Sequence[str],
    annotations: dict[str, dict[str, Any]] | None,
    skipped: list[dict[str, str]],
) -> Iterator[_Image]:
    """Yields each readable file as an `_Image`; appends `{"path", "reason"}` to `skipped` else."""
    overlay_names: set[str] = set()
    for index, path in enumerate(files):
        name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            pixels = decode_image(tf.constant(encoded)).numpy()
        except OSError as e:
            skipped.append({"path": path, "reason": f"cannot read the file ({e.strerror or e})"})
            continue
        except tf.errors.OpError as e:
            reason = f"not a decodable JPEG/PNG ({_op_error_text(e)})"
            skipped.append({"path": path, "reason": reason})
            continue
        height, width = pixels.shape[:2]
        if annotations is None:
            record = {"id": index, "file_name": name, "height": height, "width": width}
        elif name not in annotations:
            skipped.append({"path": path, "reason": "no image of that file name in --annotations"})
            continue
        else:
            known = annotations[name]
            if (int(known["height"]), int(known["width"])) != (height, width):
                reason = (
                    f"the file is {height}x{width}, --annotations says "
                    f"{known['height']}x{known['width']}"
                )
                skipped.append({"path": path, "reason": reason})
                continue
            record = {"id": known["id"], "file_name": known["file_name"]}
            record.update(height=height, width=width)
        # Two inputs with one stem (a.jpg and a.png, or two folders) must not share an overlay.
        stem = os.path.splitext(name)[0]
        overlay_name, copy = f"{stem}.png", 1
        while overlay_name in overlay_names:
            overlay_name, copy = f"{stem}-{copy}.png", copy + 1
        overlay_names.add(overlay_name)
        yield _Image(encoded, pixels, record, overlay_name)


def _op_error_text(error: tf.errors.OpError) -> str:
    """TF's message without its `{{function_node ...}}` prefix and `[Op:...]` suffix."""
    text = error.message.splitlines()[0] if error.message else type(error).__name__
    return re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:.*$", "", text)


def _batches(items: Iterator[_Image], size: int) -> Iterator[list[_Image]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pasted_masks(masks: np.ndarray, image_info: np.ndarray) -> np.ndarray:
    """`[n, P/4, P/4]` uint8 serving masks of one image -> `[n, H, W]` bool on the original.

    `paste_masks` runs eagerly: inside a tf.function, Grappler turns its `/ 255` into a multiply
    by the reciprocal, and that last-bit difference flips a few pixels at the 0.5 threshold.
    """
    info = tf.constant(image_info, tf.int32)
    height, width = int(image_info[0]), int(image_info[1])
    chunks = [
        paste_masks(tf.constant(masks[j : j + PASTE_CHUNK]), info).numpy()
        for j in range(0, len(masks), PASTE_CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, height, width), bool)


def coco_results(
    image_id: int, masks: np.ndarray, scores: np.ndarray, category_ids: np.ndarray
) -> list[dict[str, Any]]:
    """One image's detections in COCO results format.

    Args:
      image_id: COCO image id.
      masks: `[n, H, W]` bool at the original size.
      scores: `[n]` float.
      category_ids: `[n]` int, original COCO ids.

    Returns:
      n dicts `{"image_id", "category_id", "segmentation": {"size": [H, W], "counts": str},
      "score", "bbox": [x, y, w, h]}`, the box being `pycocotools.mask.toBbox` of the mask.
    """
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_utils.toBbox(rles)
    return [
        {
            "image_id": image_id,
            "category_id": int(category_id),
            "segmentation": {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode(),
            },
            "score": float(score),
            "bbox": [float(v) for v in box],
        }
        for rle, box, score, category_id in zip(rles, boxes, scores, category_ids)
    ]


def _class_names(loaded) -> list[str]:
    """The exported `class_names` (contiguous class -> name); [] if the model has none."""
    names = getattr(loaded, "class_names", None)
    return [] if names is None else [n.decode() for n in names.numpy()]


def predict(
    inputs: Sequence[str],
    model_dir: str,
    output_dir: str,
    *,
    score_threshold: float = 0.3,
    batch_size: int = 4,
    annotations_file: str | None = None,
) -> dict[str, Any]:
    """Runs the model's `serving_bytes` signature on image files and writes the outputs.

    Args:
      inputs: image files and folders (a folder means its .jpg/.jpeg/.png files, sorted).
      model_dir: a SavedModel folder, or a Pusher root with numeric version folders.
      output_dir: where the overlays, coco_results.json and images.json go (created).
      score_threshold: detections drawn in the overlays have a score at least this.
      batch_size: images per signature call.
      annotations_file: a COCO annotation JSON: image ids (and stored file names) come from its
        "images", matched by file base name. Without it, an image's id is its index among the
        expanded inputs (stable when other files are skipped).

    Returns:
      A summary: `model` (the SavedModel folder used), `output_dir`, `images` (predicted),
      `skipped` ([{"path", "reason"}]: unreadable, corrupt, or unknown to the annotations),
      `detections` (all) and `drawn` (at or above the threshold).
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    files = expand_inputs(inputs)
    if not files:
        raise PredictError(f"no .jpg/.jpeg/.png images in {', '.join(inputs)}")
    annotations = _annotation_records(annotations_file) if annotations_file else None
    saved_model_dir = resolve_saved_model(model_dir)
    loaded = tf.saved_model.load(saved_model_dir)
    if SIGNATURE_BYTES not in loaded.signatures:
        raise PredictError(f"{saved_model_dir} has no {SIGNATURE_BYTES!r} signature")
    serve = loaded.signatures[SIGNATURE_BYTES]
    names = _class_names(loaded)
    os.makedirs(output_dir, exist_ok=True)

    skipped: list[dict[str, str]] = []
    records, results = [], []
    drawn = 0
    for batch in _batches(_read_images(files, annotations, skipped), batch_size):
        encoded = tf.constant([image.encoded for image in batch])
        outputs = {key: value.numpy() for key, value in serve(images=encoded).items()}
        for i, image in enumerate(batch):
            n = int(outputs["num_detections"][i])
            masks = pasted_masks(outputs["masks"][i, :n], outputs["image_info"][i])
            scores = outputs["scores"][i, :n]
            results.extend(
                coco_results(image.record["id"], masks, scores, outputs["category_ids"][i, :n])
            )
            records.append(image.record)
            drawn += _write_overlay(
                os.path.join(output_dir, image.overlay_name),
                image.pixels,
                masks,
                outputs["classes"][i, :n],
                scores,
                names,
                score_threshold,
            )

    with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f)
    with open(os.path.join(output_dir, IMAGES_FILE), "w") as f:
        json.dump(records, f, indent=1)
    return {
        "model": saved_model_dir,
        "output_dir": output_dir,
        "images": len(records),
        "skipped": skipped,
        "detections": len(results),
        "drawn": drawn,
        "score_threshold": score_threshold,
    }


def _write_overlay(
    path: str,
    pixels: np.ndarray,
    masks: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    score_threshold: float,
) -> int:
    """Writes the overlay PNG of the detections scoring >= threshold; returns how many.

    Detections come sorted by descending score; they are drawn in reverse so that the most
    confident one ends on top, and keep their rank's colour (rank 0: `instance_color(0)`).
    """
    keep = np.flatnonzero(scores >= score_threshold)[::-1]
    labels = [names[c] if 0 <= c < len(names) else f"class_{c}" for c in classes[keep]]
    picture = overlay_instances(
        pixels,
        masks[keep],
        labels,
        scores[keep],
        colors=[instance_color(int(rank)) for rank in keep],
    )
    Image.fromarray(picture).save(path)
    return len(keep)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [
        f"Model: {summary['model']}",
        f"Images: {summary['images']} predicted, {len(summary['skipped'])} skipped",
    ]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in summary["skipped"]]
    lines += [
        f"Detections: {summary['detections']} in {RESULTS_FILE}, "
        f"{summary['drawn']} drawn (score >= {summary['score_threshold']})",
        f"Output: {summary['output_dir']} (<stem>.png overlays, {RESULTS_FILE}, {IMAGES_FILE})",
    ]
    return "\n".join(lines)
