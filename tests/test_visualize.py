"""Overlay renderer: known masks on a known image, checked pixel by pixel after a PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.visualize import instance_color, mask_outline, overlay_instances

HEIGHT, WIDTH = 80, 120


@pytest.fixture
def image() -> np.ndarray:
    """`[80, 120, 3]` uint8 with a different value at (almost) every pixel."""
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    return np.stack([2 * cols, 3 * rows, (rows + cols) % 256], axis=-1).astype(np.uint8)


def _rectangle(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """`[80, 120]` bool, True on rows [top, bottom) and columns [left, right)."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[top:bottom, left:right] = True
    return mask


def _blend(pixels: np.ndarray, color, alpha: float = 0.5) -> np.ndarray:
    return np.floor((1 - alpha) * pixels.astype(np.float64) + alpha * np.array(color) + 0.5)


def _png_round_trip(picture: np.ndarray, path) -> np.ndarray:
    Image.fromarray(picture).save(path)
    return np.array(Image.open(path))


def _reference_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Plain loop: mask pixels with a non-mask pixel (or the border) within Chebyshev `width`."""
    padded = np.pad(mask, width, constant_values=False)
    out = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        out[y, x] = not padded[y : y + 2 * width + 1, x : x + 2 * width + 1].all()
    return out


def test_single_mask_blend_outline_label_and_untouched_background(image, tmp_path):
    mask = _rectangle(20, 30, 60, 100)
    color = instance_color(0)
    picture = _png_round_trip(
        overlay_instances(image, mask[np.newaxis], ["cat"], [0.87]), tmp_path / "one.png"
    )
    assert picture.shape == image.shape and picture.dtype == np.uint8

    # Interior, below the label box (at the top-left corner (y 20, x 30), about 12 px high).
    interior = np.zeros_like(mask)
    interior[40:58, 32:98] = True
    np.testing.assert_array_equal(picture[interior], _blend(image[interior], color))

    # The 2-px outline, below the label: solid colour.
    ring = _reference_outline(mask, 2)
    ring[:40] = False
    assert ring.sum() == 2 * 2 * 18 + 2 * 70  # Sides of rows 40..57, plus the bottom rows.
    np.testing.assert_array_equal(picture[ring], np.broadcast_to(color, (ring.sum(), 3)))

    # Nothing outside the mask changes (the label box lies inside the mask here).
    np.testing.assert_array_equal(picture[~mask], image[~mask])

    # Label box (about 39 x 12 px for "cat 0.87"): filled with the colour, with text in it.
    # Its inside holds only fill and ink; the ink contrasts: white on this red (luminance
    # 102 < 128), anti-aliased, so lighter than the fill in every channel.
    np.testing.assert_array_equal(picture[20:22, 30:34], np.broadcast_to(color, (2, 4, 3)))
    box = picture[20:30, 30:60].reshape(-1, 3)
    fill = (box == color).all(axis=1)
    assert fill.sum() > 100 and (~fill).sum() > 20
    assert (box[~fill] >= color).all() and (box[~fill] > color).any(axis=1).all()


def test_outline_is_the_chebyshev_border_of_any_shape():
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    disc = (rows - 40) ** 2 + (cols - 60) ** 2 <= 25**2
    corner = _rectangle(0, 0, 10, 10)  # Touches the image border: outlined along it.
    for mask in (disc, corner, disc | corner):
        for width in (1, 2, 3):
            np.testing.assert_array_equal(
                mask_outline(mask, width), _reference_outline(mask, width)
            )
    assert not mask_outline(disc, 0).any()


def test_later_instance_wins_on_the_overlap(image, tmp_path):
    first, second = _rectangle(10, 10, 50, 70), _rectangle(30, 40, 75, 110)
    colors = [instance_color(0), instance_color(1)]
    assert colors[0] != colors[1]
    picture = _png_round_trip(
        overlay_instances(image, np.stack([first, second]), ["a", "b"], [0.9, 0.8]),
        tmp_path / "two.png",
    )
    # Overlap rows 30..49, columns 40..69; away from both outlines and from the labels
    # (at (10, 10) and (30, 40), about 12 px high).
    overlap = np.zeros_like(first)
    overlap[45:48, 43:68] = True
    np.testing.assert_array_equal(picture[overlap], _blend(image[overlap], colors[1]))
    only_first = np.zeros_like(first)
    only_first[25:48, 12:38] = True
    np.testing.assert_array_equal(picture[only_first], _blend(image[only_first], colors[0]))
    # The second outline crosses the first mask: the later colour is on top.
    np.testing.assert_array_equal(picture[45:48, 40:42], np.broadcast_to(colors[1], (3, 2, 3)))


def test_label_is_moved_inside_the_image(image):
    mask = _rectangle(74, 112, 80, 120)  # A small box in the bottom-right corner.
    color = (10, 200, 30)
    picture = overlay_instances(image, mask[np.newaxis], ["long label name"], colors=[color])
    # The box's bottom padding row ends at the image's last row and reaches left of the mask.
    np.testing.assert_array_equal(picture[-1, 90:], np.broadcast_to(color, (WIDTH - 90, 3)))
    np.testing.assert_array_equal(picture[:60], image[:60])


def test_options_alpha_colors_numeric_masks_and_no_outline(image):
    mask = _rectangle(20, 30, 60, 100)
    color = (0, 0, 255)
    picture = overlay_instances(
        image, mask[np.newaxis].astype(np.uint8), ["x"], alpha=0.25, colors=[color], outline_width=0
    )
    body = mask.copy()
    body[:40] = False  # Below the label.
    np.testing.assert_array_equal(picture[body], _blend(image[body], color, alpha=0.25))


def test_no_instances_give_an_unchanged_copy(image):
    picture = overlay_instances(image, np.zeros((0, HEIGHT, WIDTH), bool), [])
    np.testing.assert_array_equal(picture, image)
    assert not np.shares_memory(picture, image)


def test_bad_shapes_and_lengths_raise(image):
    with pytest.raises(ValueError, match="masks must be"):
        overlay_instances(image, np.zeros((1, HEIGHT + 1, WIDTH), bool), ["a"])
    with pytest.raises(ValueError, match="masks must be"):
        overlay_instances(image, np.zeros((HEIGHT, WIDTH), bool), ["a"])
    with pytest.raises(ValueError, match="image must be"):
        overlay_instances(image[..., 0], np.zeros((1, HEIGHT, WIDTH), bool), ["a"])
    with pytest.raises(ValueError, match="labels has 2 entries for 1 masks"):
        overlay_instances(image, np.zeros((1, HEIGHT, WIDTH), bool), ["a", "b"])
    with pytest.raises(ValueError, match="scores has 0 entries"):
        overlay_instances(image, np.zeros((1, HEIGHT, WIDTH), bool), ["a"], [])


def test_palette_is_deterministic_distinct_and_bright():
    palette = [instance_color(i) for i in range(12)]
    assert palette == [instance_color(i) for i in range(12)]
    assert len(set(palette)) == 12
    assert palette[0] == (255, 38, 38)
    for color in palette:
        assert max(color) == 255 and all(0 <= c <= 255 for c in color)
    # Successive instances (most often neighbours in a picture) differ clearly.
    for a, b in zip(palette, palette[1:]):
        assert sum(abs(x - y) for x, y in zip(a, b)) > 150
