"""Tensor ops and the conv-GN-ReLU block shared by the SOLOv2 heads, losses and post-processing.

All images and feature maps are channels-last, `[batch, height, width, channels]`. Resizing uses
`tf.image.resize` without antialiasing and with half-pixel centres, which is what PyTorch's
`F.interpolate(..., align_corners=False)` computes, so the official model's resampling is
reproduced exactly.
"""

import keras
import tensorflow as tf


def spatial_size(x: tf.Tensor) -> tuple:
    """`(height, width)` of a `[B, H, W, C]` tensor: Python ints when static, else scalar tensors."""
    dynamic = tf.shape(x)
    height = x.shape[1] if x.shape[1] is not None else dynamic[1]
    width = x.shape[2] if x.shape[2] is not None else dynamic[2]
    return height, width


def resize(x: tf.Tensor, size, method: str = "bilinear") -> tf.Tensor:
    """Resizes `[B, H, W, C]` to `size = (h, w)` keeping the dtype.

    `method` is "bilinear" (= PyTorch bilinear, align_corners=False) or "nearest"
    (= PyTorch nearest for integer up-scaling factors).
    """
    resized = tf.image.resize(x, size, method=method)
    return tf.cast(resized, x.dtype)


def coord_features(height, width, batch, dtype=tf.float32) -> tf.Tensor:
    """CoordConv channels `[batch, height, width, 2]`: channel 0 is x, channel 1 is y.

    Both run over `linspace(-1, 1, n)` along their axis (x along the width, y along the height),
    as in the official head: `torch.cat([x, y], 1)` after `meshgrid(y_range, x_range)`.
    """
    x = tf.linspace(tf.constant(-1.0, dtype), tf.constant(1.0, dtype), width)
    y = tf.linspace(tf.constant(-1.0, dtype), tf.constant(1.0, dtype), height)
    grid_y, grid_x = tf.meshgrid(y, x, indexing="ij")  # both [height, width]
    coords = tf.stack([grid_x, grid_y], axis=-1)
    return tf.tile(coords[tf.newaxis], [batch, 1, 1, 1])


def concat_coords(x: tf.Tensor) -> tf.Tensor:
    """Appends the two CoordConv channels: `[B, H, W, C]` -> `[B, H, W, C + 2]`."""
    height, width = spatial_size(x)
    coords = coord_features(height, width, tf.shape(x)[0], x.dtype)
    return tf.concat([x, coords], axis=-1)


def dynamic_mask_logits(kernels: tf.Tensor, mask_features: tf.Tensor) -> tf.Tensor:
    """Applies per-instance 1x1 dynamic kernels to the mask features, as one batched matmul.

    Args:
      kernels: `[B, K, E]`, one 1x1 kernel (E weights, no bias) per instance or grid cell.
      mask_features: `[B, h, w, E]` (h, w = H/4, W/4).

    Returns:
      Mask logits `[B, K, h, w]`: `logits[b, k] = sum_e kernels[b, k, e] * mask_features[b, ..., e]`,
      the official `F.conv2d(mask_features, kernel.view(K, E, 1, 1))`.
    """
    kernels = tf.cast(kernels, mask_features.dtype)
    return tf.einsum("bke,bhwe->bkhw", kernels, mask_features)


@keras.saving.register_keras_serializable(package="solov2")
class ConvNormReLU(keras.layers.Layer):
    """Conv (no bias, normal std 0.01 init) -> GroupNorm -> ReLU: mmcv's `ConvModule` with GN.

    Args:
      filters: output channels; must be divisible by `norm_groups`.
      kernel_size: square kernel size; padding keeps the spatial size (stride 1).
      norm_groups: GroupNorm groups (official: 32).
    """

    def __init__(self, filters: int, kernel_size: int = 3, norm_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.norm_groups = norm_groups
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="conv",
        )
        # PyTorch GroupNorm epsilon (Keras defaults to 1e-3).
        self.norm = keras.layers.GroupNormalization(groups=norm_groups, epsilon=1e-5, name="gn")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.norm.build((*input_shape[:-1], self.filters))

    def call(self, x):
        return tf.nn.relu(self.norm(self.conv(x)))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=self.kernel_size, norm_groups=self.norm_groups
        )
        return config
