"""Feature pyramid network (mmdetection v1 `FPN`, as configured by the official SOLOv2)."""

import keras

from models import ops


@keras.saving.register_keras_serializable(package="solov2")
class FPN(keras.layers.Layer):
    """`[C2, C3, C4, C5]` -> `[P2, P3, P4, P5, P6]`, all with `channels` channels.

    Lateral 1x1 convs, top-down pathway with nearest upsampling, 3x3 output convs (all with
    bias, Glorot-uniform init = mmcv `xavier_init(distribution='uniform')`). No extra convs:
    P6 is `max_pool(kernel 1, stride 2)` of P5, i.e. `P5[:, ::2, ::2]`. P_l has stride 2**l.

    Args:
      channels: output channels of every level (official: 256).
    """

    num_inputs = 4

    def __init__(self, channels: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.lateral_convs = [
            keras.layers.Conv2D(channels, 1, name=f"lateral_c{level}")
            for level in range(2, 2 + self.num_inputs)
        ]
        self.output_convs = [
            keras.layers.Conv2D(channels, 3, padding="same", name=f"output_p{level}")
            for level in range(2, 2 + self.num_inputs)
        ]

    def build(self, input_shapes):
        for lateral, output, shape in zip(self.lateral_convs, self.output_convs, input_shapes):
            lateral.build(shape)
            output.build((*shape[:-1], self.channels))

    def call(self, features):
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for level in range(self.num_inputs - 1, 0, -1):
            finer = laterals[level - 1]
            upsampled = ops.resize(laterals[level], ops.spatial_size(finer), method="nearest")
            laterals[level - 1] = finer + upsampled
        outputs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        outputs.append(outputs[-1][:, ::2, ::2, :])
        return outputs

    def compute_output_shape(self, input_shapes):
        shapes = [(*shape[:-1], self.channels) for shape in input_shapes]
        batch, height, width, _ = shapes[-1]
        half = [None if d is None else (d + 1) // 2 for d in (height, width)]
        return [*shapes, (batch, *half, self.channels)]

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels)
        return config
