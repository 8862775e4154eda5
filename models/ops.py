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
class GroupNormalization(keras.layers.GroupNormalization):
    """Keras `GroupNormalization` with the same result, computed from per-channel sums.

    Keras reshapes `[B, H, W, C]` to `[B, H, W, G, C / G]` and reduces over three of its axes;
    TensorFlow's CPU kernels handle that reduction and its gradient slowly. Here the statistics
    come from spatial sums per channel (`[B, C]`), combined per group on the small tensor, and
    the input is normalised in one multiply-add, in float32 as Keras does. Forward and backward
    in bfloat16, 32 groups (`benchmarks/normalization.py`): `[4, 40, 40, 64]` (demo_cpu's head)
    1.7 ms against 4.1 ms, `[4, 64, 88, 32]` (its mask branch) 3.0 against 5.1 ms. Variables,
    config and output are Keras's (the variance is the two-pass one, as Keras's). Other layouts
    (not 4-D channels-last, no scale or centre) fall back to Keras.
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3) or not (self.scale and self.center):
            return super().call(inputs)
        channels = inputs.shape[-1]
        per_group = channels // self.groups
        x = tf.cast(inputs, tf.float32)
        height, width = spatial_size(x)
        count = tf.cast(height * width * per_group, tf.float32)

        def group_mean(channel_sums):
            """`[B, C]` sums over H, W -> `[B, 1, 1, C]`: each channel gets its group's mean."""
            grouped = tf.reshape(channel_sums, [-1, self.groups, per_group])
            means = tf.reduce_sum(grouped, axis=-1, keepdims=True) / count
            means = tf.broadcast_to(means, tf.shape(grouped))
            return tf.reshape(means, [-1, 1, 1, channels])

        centered = x - group_mean(tf.reduce_sum(x, axis=[1, 2]))
        variance = group_mean(tf.reduce_sum(tf.square(centered), axis=[1, 2]))
        scale = tf.math.rsqrt(variance + self.epsilon) * tf.cast(self.gamma, tf.float32)
        outputs = centered * scale + tf.cast(self.beta, tf.float32)
        return tf.cast(outputs, inputs.dtype)


@keras.saving.register_keras_serializable(package="solov2")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras `BatchNormalization` computed by TensorFlow's fused kernel (`FusedBatchNormV3`).

    Keras 3 normalises with separate moment and arithmetic ops; on a CPU the fused kernel is
    2.5-3.9x faster forward and backward in training mode (`benchmarks/normalization.py`,
    bfloat16: `[4, 128, 176, 32]`, demo_cpu's stem, 3.6 ms against 12.3 ms), and the ResNet
    has a BatchNorm after every conv. Same variables, config and modes: batch statistics when
    `training` and trainable, the moving ones otherwise. One difference, towards PyTorch's
    `BatchNorm2d`: the moving variance is updated with the unbiased batch variance (Keras uses
    the biased one). Other layouts (not 4-D channels-last, masks, no scale or centre) fall
    back to Keras. TensorFlow has the kernel for float32, float16 and bfloat16 on CPU and GPU
    (bfloat16 on GPU needs Ampere or later), and XLA lowers it for TPU.
    """

    def call(self, inputs, training=None, mask=None):
        fusable = len(inputs.shape) == 4 and self.axis in (-1, 3) and self.scale and self.center
        if mask is not None or not fusable:
            return super().call(inputs, training=training, mask=mask)
        gamma = tf.cast(self.gamma, tf.float32)
        beta = tf.cast(self.beta, tf.float32)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1 - self.momentum)
            )
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)


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
        self.norm = GroupNormalization(groups=norm_groups, epsilon=1e-5, name="gn")

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
