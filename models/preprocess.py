"""Image geometry and normalisation: the ONE preprocessing used by training, targets and serving.

Official SOLOv2 (mmdet v1 pipeline): keep-ratio resize so the shorter side is `short_side`
unless the longer side would exceed `max_size`; optional horizontal flip; normalise with the
ImageNet RGB mean/std; pad bottom/right with zeros to a multiple of 32. Here the pad target is a
fixed square `pad_size` (the config's max size rounded up to 32), so every batch has one static
shape (TPU-friendly). Official pads each batch to its largest image instead; a fixed pad changes
which grid cell a centre lands in only through `upsampled_size`, exactly as a larger image in the
same official batch would.

SoloTargetGen (masks), the training input pipeline (images) and both serving signatures call
these functions; `tests/test_preprocess.py` checks the parity.
"""

from __future__ import annotations

import tensorflow as tf

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32


def padded_size(max_size: int) -> int:
    """The fixed square pad for a config: `max_size` rounded up to a multiple of 32."""
    return -(-max_size // SIZE_DIVISOR) * SIZE_DIVISOR


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


def pad_to(tensor: tf.Tensor, size: int) -> tf.Tensor:
    """Zero-pads the two spatial dims ([H, W, C] or [N, H, W]) at the bottom/right to size."""
    if tensor.shape.rank == 3 and tensor.shape[-1] == 3:  # Image [H, W, 3].
        return tf.image.pad_to_bounding_box(tensor, 0, 0, size, size)
    height, width = tf.shape(tensor)[1], tf.shape(tensor)[2]
    padded = tf.pad(tensor, [[0, 0], [0, size - height], [0, size - width]])
    return tf.ensure_shape(padded, [None, size, size])


def preprocess_image(
    image: tf.Tensor, *, short_side: int, max_size: int, flip=False
) -> tuple[tf.Tensor, tf.Tensor]:
    """Decoded RGB [H, W, 3] -> (model input [P, P, 3] float32, resized (h, w) int32 [2]).

    P = padded_size(max_size). `flip` (bool or scalar bool tensor) mirrors horizontally after the
    resize, before padding, as the official pipeline does.
    """
    new_height, new_width = resized_shape(
        tf.shape(image)[0], tf.shape(image)[1], short_side, max_size
    )
    resized = resize_image(image, new_height, new_width)
    resized = tf.cond(
        tf.convert_to_tensor(flip), lambda: tf.image.flip_left_right(resized), lambda: resized
    )
    size = padded_size(max_size)
    padded = pad_to(normalize(resized), size)
    return tf.ensure_shape(padded, [size, size, 3]), tf.stack([new_height, new_width])


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG bytes -> [H, W, 3] uint8 RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])
