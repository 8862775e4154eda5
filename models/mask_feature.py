"""SOLOv2 unified mask-feature branch (official `MaskFeatHead`)."""

import keras

from models import ops


@keras.saving.register_keras_serializable(package="solov2")
class MaskFeatureHead(keras.layers.Layer):
    """`[P2, P3, P4, P5]` (strides 4..32) -> mask features `[B, H/4, W/4, out_channels]`.

    Every conv is 3x3 + GroupNorm + ReLU with `mid_channels` outputs; "up" is a bilinear x2
    upsampling (align_corners=False):
      P2: conv;  P3: conv, up;  P4: (conv, up) x 2;  P5 + 2 CoordConv channels: (conv, up) x 3.
    The four stride-4 maps are summed, then a 1x1 conv + GroupNorm + ReLU maps to
    `out_channels` (= E, the dynamic-kernel size). Needs H, W multiples of 32 so the x2
    upsamplings land exactly on P2's size.

    Args:
      mid_channels: channels of the per-level convs (official 128).
      out_channels: E (official 256; light 128).
      norm_groups: GroupNorm groups (official 32).
    """

    num_levels = 4

    def __init__(
        self, mid_channels: int = 128, out_channels: int = 256, norm_groups: int = 32, **kwargs
    ):
        super().__init__(**kwargs)
        self.mid_channels = mid_channels
        self.out_channels = out_channels
        self.norm_groups = norm_groups
        # Level l (P_{l+2}) has max(1, l) convs; all but P2's are followed by an upsampling.
        # Kept as one flat list: Keras weight saving does not track nested lists.
        self.convs = [
            ops.ConvNormReLU(mid_channels, 3, norm_groups, name=f"p{level + 2}_conv{index}")
            for level in range(self.num_levels)
            for index in range(max(1, level))
        ]
        self.output_conv = ops.ConvNormReLU(out_channels, 1, norm_groups, name="output")

    @property
    def level_convs(self) -> list[list[ops.ConvNormReLU]]:
        """The convs of each input level: 1, 1, 2 and 3 layers for P2..P5."""
        levels, start = [], 0
        for level in range(self.num_levels):
            levels.append(self.convs[start : start + max(1, level)])
            start += max(1, level)
        return levels

    def build(self, input_shapes):
        for level, (convs, shape) in enumerate(zip(self.level_convs, input_shapes)):
            in_channels = shape[-1] + 2 if level == self.num_levels - 1 else shape[-1]
            for conv in convs:
                conv.build((shape[0], None, None, in_channels))
                in_channels = self.mid_channels
        self.output_conv.build((input_shapes[0][0], None, None, self.mid_channels))

    def call(self, features):
        total = None
        for level, (convs, x) in enumerate(zip(self.level_convs, features)):
            if level == self.num_levels - 1:
                x = ops.concat_coords(x)
            for conv in convs:
                x = conv(x)
                if level > 0:
                    height, width = ops.spatial_size(x)
                    x = ops.resize(x, (2 * height, 2 * width))
            total = x if total is None else total + x
        return self.output_conv(total)

    def compute_output_shape(self, input_shapes):
        return (*input_shapes[0][:-1], self.out_channels)

    def get_config(self):
        config = super().get_config()
        config.update(
            mid_channels=self.mid_channels,
            out_channels=self.out_channels,
            norm_groups=self.norm_groups,
        )
        return config
