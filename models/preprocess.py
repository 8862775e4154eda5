"""Image geometry and normalisation: the ONE preprocessing used by training, targets and serving.

Official SOLOv2 (mmdet v1 pipeline): keep-ratio resize so the shorter side is `short_side`
unless the longer side would exceed `max_size`; optional horizontal flip; normalise with the
ImageNet RGB mean/std; pad bottom/right with zeros to a multiple of 32. Official pads each
batch to its largest image, and batches images of one orientation together (mmdet's
aspect-ratio `GroupSampler`). Here the pad is fixed, so every batch has a static shape
(TPU-friendly): serving and evaluation pad to the square `padded_size` (the config's max size
rounded up to 32); training pads each image to its orientation's rectangle
(`orientation_pad_shape`: short pad x long pad, or transposed) when the recipe's
`TrainConfig.orientation_pad` is on, so that a landscape batch does not carry a square's worth
of padding. A fixed pad changes which grid cell a centre lands in only through
`upsampled_size`, exactly as a larger image in the same official batch would.

SoloTargetGen (masks), the training input pipeline (images) and both serving signatures call
these functions; `tests/test_solo_targets.py` checks the parity.
"""

from __future__ import annotations

import tensorflow as tf

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32


def padded_size(max_size: int) -> int:
    """The fixed square pad for a config: `max_size` rounded up to a multiple of 32."""
    return -(-max_size // SIZE_DIVISOR) * SIZE_DIVISOR


def orientation_pad_shape(height, width, short_side: int, max_size: int):
    """The training pad (pad height, pad width) of an image of `height` x `width`.

    A landscape (or square) image resized by `resized_shape(..., short_side, max_size)` is at
    most `short_side` high and `max_size` wide, so it pads to (padded_size(short), padded_size
    (max_size)), short = min(short_side, max_size); a portrait image to the transpose.
    `short_side` is the largest of the recipe's training short sides, so every scale variant of
    an image shares its pad. Works on Python ints (returns ints) or scalar tensors (int32).
    """
    short = padded_size(min(short_side, max_size))
    long = padded_size(max_size)
    if isinstance(height, int) and isinstance(width, int):
        return (short, long) if width >= height else (long, short)
    landscape = tf.cast(width, tf.int64) >= tf.cast(height, tf.int64)
    return tf.where(landscape, short, long), tf.where(landscape, long, short)


def resized_shape(height, width, short_side: int, max_size: int):
    """mmcv's keep-ratio rescale: scale = min(short/min(h, w), max/max(h, w)).

    Returns int32 (new_height, new_width), rounded as mmcv does (int(x * scale + 0.5)).
    Works on Python ints or scalar tensors.
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    short_side = tf.cast(short_side, tf.float32)
    max_size = tf.cast(max_size, tf.float32)
    scale = tf.minimum(short_side / tf.minimum(height, width), max_size / tf.maximum(height, width))
    new_height = tf.cast(tf.floor(height * scale + 0.5), tf.int32)
    new_width = tf.cast(tf.floor(width * scale + 0.5), tf.int32)
    return new_height, new_width


def resize_image(image: tf.Tensor, new_height, new_width) -> tf.Tensor:
    """[H, W, 3] uint8/float -> [h, w, 3] float32, bilinear (official: cv2 INTER_LINEAR)."""
    image = tf.cast(image, tf.float32)
    return tf.image.resize(image, tf.stack([new_height, new_width]), method="bilinear")


def resize_masks(masks: tf.Tensor, new_height, new_width) -> tf.Tensor:
    """[N, H, W] uint8 -> [N, h, w] uint8, nearest neighbour (official: imrescale 'nearest')."""
    resized = tf.image.resize(
        masks[..., tf.newaxis], tf.stack([new_height, new_width]), method="nearest"
    )
    return tf.cast(resized[..., 0], tf.uint8)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """[..., 3] RGB float in [0, 255] -> mean/std normalised float32."""
    return (tf.cast(image, tf.float32) - PIXEL_MEAN) / PIXEL_STD


def pad_to(tensor: tf.Tensor, pad_height, pad_width=None) -> tf.Tensor:
    """Zero-pads the two spatial dims ([H, W, C] or [N, H, W]) at the bottom/right to
    `pad_height` x `pad_width` (default: the square `pad_height` x `pad_height`); ints or scalar
    tensors."""
    if pad_width is None:
        pad_width = pad_height
    if tensor.shape.rank == 3 and tensor.shape[-1] == 3:  # Image [H, W, 3].
        return tf.image.pad_to_bounding_box(tensor, 0, 0, pad_height, pad_width)
    height, width = tf.shape(tensor)[1], tf.shape(tensor)[2]
    padded = tf.pad(tensor, [[0, 0], [0, pad_height - height], [0, pad_width - width]])
    static = [d if isinstance(d, int) else None for d in (pad_height, pad_width)]
    return tf.ensure_shape(padded, [None, *static])


def preprocess_image(
    image: tf.Tensor, *, short_side: int, max_size: int, flip=False, pad_shape=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Decoded RGB [H, W, 3] -> (model input [P, P, 3] float32, resized (h, w) int32 [2]).

    P = padded_size(max_size). `flip` (bool or scalar bool tensor) mirrors horizontally after the
    resize, before padding, as the official pipeline does. `pad_shape` (pad height, pad width;
    ints or scalar tensors, e.g. `orientation_pad_shape`) pads to that rectangle instead: the
    model input is then [pad height, pad width, 3] (static where the pad is an int).
    """
    new_height, new_width = resized_shape(
        tf.shape(image)[0], tf.shape(image)[1], short_side, max_size
    )
    resized = resize_image(image, new_height, new_width)
    resized = tf.cond(
        tf.convert_to_tensor(flip), lambda: tf.image.flip_left_right(resized), lambda: resized
    )
    if pad_shape is None:
        pad_shape = (padded_size(max_size),) * 2
    padded = pad_to(normalize(resized), *pad_shape)
    static = [d if isinstance(d, int) else None for d in pad_shape]
    return tf.ensure_shape(padded, [*static, 3]), tf.stack([new_height, new_width])


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG bytes -> [H, W, 3] uint8 RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])
