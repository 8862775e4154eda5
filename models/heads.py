"""SOLOv2 instance head: the category and dynamic-kernel branches over the S x S grids."""

import math

import keras
import tensorflow as tf

from models import ops


@keras.saving.register_keras_serializable(package="solov2")
class SOLOv2InstanceHead(keras.layers.Layer):
    """FPN levels `[P2, P3, P4, P5, P6]` (`[B, H_l, W_l, F]`) -> grid-cell predictions.

    Per level (official `split_feats` + `forward_single`): the five inputs are P2 bilinearly
    resized x0.5, P3, P4, P5 and P6 bilinearly resized to P5's size (strides 8, 8, 16, 32, 32);
    two CoordConv channels (x, y in [-1, 1]) are appended and the F + 2 channel map is bilinearly
    resized to S x S. The kernel branch sees all F + 2 channels, the category branch the same
    resized map without the coordinates. Each branch is a tower of `num_convs` x
    (3x3 conv, GroupNorm, ReLU) shared by all levels, then a 3x3 output conv: `num_classes`
    logits (bias prior -log((1 - p) / p)) or `kernel_channels` dynamic-kernel weights.

    Returns a dict, cells of all levels concatenated level by level, row-major within a level
    (cell (i, j) of level l at `offset_l + i * S_l + j`):
      `category_logits` `[B, sum S_l^2, num_classes]`, `kernels` `[B, sum S_l^2, kernel_channels]`.

    Args:
      num_classes: category logits per cell (no background channel).
      grids: S per level (official: 40, 36, 24, 16, 12).
      num_convs: tower depth (official 4; light 2).
      channels: tower width (official 512; light 256); divisible by `norm_groups`.
      category_channels: width of the category tower alone; None (official) = `channels`.
      kernel_channels: E, weights of a 1x1 dynamic kernel (= mask-feature channels).
      norm_groups: GroupNorm groups (official 32).
      prior_prob: initial foreground probability of the category logits.
    """

    def __init__(
        self,
        num_classes: int,
        grids=(40, 36, 24, 16, 12),
        num_convs: int = 4,
        channels: int = 512,
        category_channels: int | None = None,
        kernel_channels: int = 256,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
        **kwargs,
    ):
        kwargs.setdefault("name", "solov2_instance_head")
        super().__init__(**kwargs)
        if len(grids) != 5:
            raise ValueError(f"the head resamples exactly 5 FPN levels, got grids={grids}")
        self.num_classes = num_classes
        self.grids = tuple(grids)
        self.num_convs = num_convs
        self.channels = channels
        self.category_channels = category_channels or channels
        self.kernel_channels = kernel_channels
        self.norm_groups = norm_groups
        self.prior_prob = prior_prob

        def tower(branch, width):
            return [
                ops.ConvNormReLU(width, 3, norm_groups, name=f"{branch}_tower_{index}")
                for index in range(num_convs)
            ]

        self.kernel_tower = tower("kernel", channels)
        self.category_tower = tower("category", self.category_channels)
        self.kernel_output = keras.layers.Conv2D(
            kernel_channels,
            3,
            padding="same",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="kernel_output",
        )
        self.category_output = keras.layers.Conv2D(
            num_classes,
            3,
            padding="same",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            bias_initializer=keras.initializers.Constant(-math.log((1 - prior_prob) / prior_prob)),
            name="category_output",
        )

    def build(self, input_shapes):
        batch, _, _, in_channels = input_shapes[0]
        kernel_shape = (batch, None, None, in_channels + 2)
        category_shape = (batch, None, None, in_channels)
        for kernel_layer, category_layer in zip(self.kernel_tower, self.category_tower):
            kernel_layer.build(kernel_shape)
            category_layer.build(category_shape)
            kernel_shape = (batch, None, None, self.channels)
            category_shape = (batch, None, None, self.category_channels)
        self.kernel_output.build(kernel_shape)
        self.category_output.build(category_shape)

    def level_inputs(self, features):
        """The five head inputs `[B, h_l, w_l, F]` at strides 8, 8, 16, 32, 32 (`split_feats`)."""
        p2, p3, p4, p5, p6 = features
        p2_height, p2_width = ops.spatial_size(p2)
        p2_half = ops.resize(p2, (p2_height // 2, p2_width // 2))
        p6_up = ops.resize(p6, ops.spatial_size(p5))
        return [p2_half, p3, p4, p5, p6_up]

    def level_outputs(self, features):
        """Per-level maps: lists of `[B, S_l, S_l, num_classes]` and `[B, S_l, S_l, E]`."""
        category_maps, kernel_maps = [], []
        for x, grid in zip(self.level_inputs(features), self.grids):
            kernel_features = ops.resize(ops.concat_coords(x), (grid, grid))
            category_features = kernel_features[..., :-2]
            for layer in self.kernel_tower:
                kernel_features = layer(kernel_features)
            for layer in self.category_tower:
                category_features = layer(category_features)
            kernel_maps.append(self.kernel_output(kernel_features))
            category_maps.append(self.category_output(category_features))
        return category_maps, kernel_maps

    def call(self, features):
        category_maps, kernel_maps = self.level_outputs(features)

        def flatten(maps, depth):
            return tf.concat(
                [tf.reshape(m, [-1, grid * grid, depth]) for m, grid in zip(maps, self.grids)],
                axis=1,
            )

        return {
            "category_logits": flatten(category_maps, self.num_classes),
            "kernels": flatten(kernel_maps, self.kernel_channels),
        }

    def compute_output_shape(self, input_shapes):
        batch = input_shapes[0][0]
        cells = sum(grid * grid for grid in self.grids)
        return {
            "category_logits": (batch, cells, self.num_classes),
            "kernels": (batch, cells, self.kernel_channels),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            grids=list(self.grids),
            num_convs=self.num_convs,
            channels=self.channels,
            category_channels=self.category_channels,
            kernel_channels=self.kernel_channels,
            norm_groups=self.norm_groups,
            prior_prob=self.prior_prob,
        )
        return config
