"""Instance overlays: coloured masks, outlines and "name score" labels drawn on an image.

Pure NumPy + Pillow, so it runs anywhere a picture is needed (`solov2 predict`, reports). Used
by `pipeline/predict.py`; masks come from `models.postprocess.paste_masks` at the original size.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Hue step of the palette: the golden-ratio conjugate keeps successive hues far apart for any
# number of instances, without a palette length to run out of.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_LABEL_PADDING = 2


def instance_color(index: int) -> tuple[int, int, int]:
    """The RGB colour of instance `index`: deterministic, bright, and distinct from its neighbours.

    Hues step by the golden ratio from red (index 0 is (255, 38, 38)); saturation 0.85 and
    value 1.0 keep every colour bright on photos.
    """
    hue = (index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return (round(red * 255), round(green * 255), round(blue * 255))


def mask_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """`[H, W]` bool mask -> `[H, W]` bool: mask pixels within `width` of a non-mask pixel.

    Distance is Chebyshev (a (2 * width + 1) square); pixels beyond the image border count as
    non-mask, so a mask touching the border is outlined along it. `width` 0 gives no outline.
    """
    if width <= 0:
        return np.zeros_like(mask, dtype=bool)
    window = 2 * width + 1
    # Erosion by a square is separable: rows, then columns.
    padded = np.pad(mask, ((0, 0), (width, width)), constant_values=False)
    eroded = np.lib.stride_tricks.sliding_window_view(padded, window, axis=1).all(axis=-1)
    padded = np.pad(eroded, ((width, width), (0, 0)), constant_values=False)
    eroded = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0).all(axis=-1)
    return mask & ~eroded


def overlay_instances(
    image: np.ndarray,
    masks: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None = None,
    *,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
    outline_width: int = 2,
) -> np.ndarray:
    """Draws K instances over an image and returns the picture.

    For each instance k, in order (later instances draw over earlier ones):
      - its mask pixels become `floor((1 - alpha) * image + alpha * colour + 0.5)`, blended
        from the ORIGINAL image pixel (so on an overlap the later instance replaces the
        earlier one rather than blending on top of it);
      - its outline (`mask_outline(mask, outline_width)`) is painted in the solid colour.
    Then each label ("name 0.87", or "name" without scores) is written in black or white on a
    box filled with the instance's colour, at the top-left of the mask's bounding box, moved
    inside the image when it would stick out. Labels go on top of every mask so that none is
    hidden by a later fill; later labels still cover earlier ones. Empty masks get no label.

    Args:
      image: `[H, W, 3]` uint8 RGB.
      masks: `[K, H, W]` bool, or numeric where non-zero means inside.
      labels: K class names.
      scores: K floats, or None for labels without a score.
      alpha: fill opacity in [0, 1].
      colors: K RGB tuples; default `instance_color(k)`.
      outline_width: outline thickness in pixels (0: none).

    Returns:
      A new `[H, W, 3]` uint8 RGB array; K = 0 gives an unchanged copy of `image`.

    Raises:
      ValueError: on an image that is not `[H, W, 3]` uint8, masks that are not `[K, H, W]`
        with the image's H and W, or labels / scores / colors whose length is not K.
    """
    image = np.asarray(image)
    masks = np.asarray(masks)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks must be [K, H, W] with the image's H, W = {image.shape[:2]}, got {masks.shape}"
        )
    num = masks.shape[0]
    for name, values in (("labels", labels), ("scores", scores), ("colors", colors)):
        if values is not None and len(values) != num:
            raise ValueError(f"{name} has {len(values)} entries for {num} masks")
    if colors is None:
        colors = [instance_color(k) for k in range(num)]

    masks = masks != 0
    original = image.astype(np.float64)
    canvas = image.copy()
    for mask, color in zip(masks, colors):
        blended = (1.0 - alpha) * original[mask] + alpha * np.asarray(color, np.float64)
        canvas[mask] = np.floor(blended + 0.5).astype(np.uint8)
        canvas[mask_outline(mask, outline_width)] = color

    if num == 0:
        return canvas
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for k, (mask, color) in enumerate(zip(masks, colors)):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        text = labels[k] if scores is None else f"{labels[k]} {float(scores[k]):.2f}"
        _draw_label(draw, text, (int(cols[0]), int(rows[0])), tuple(color), picture.size)
    return np.array(picture)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    top_left: tuple[int, int],
    color: tuple[int, int, int],
    image_size: tuple[int, int],
) -> None:
    """Writes `text` on a `color` box whose top-left is `(x, y)`, clamped inside the image."""
    font = _font()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    box_width = right - left + 2 * _LABEL_PADDING
    box_height = bottom - top + 2 * _LABEL_PADDING
    width, height = image_size
    x = min(max(top_left[0], 0), max(width - box_width, 0))
    y = min(max(top_left[1], 0), max(height - box_height, 0))
    draw.rectangle([x, y, x + box_width - 1, y + box_height - 1], fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
    draw.text((x + _LABEL_PADDING - left, y + _LABEL_PADDING - top), text, fill=ink, font=font)
