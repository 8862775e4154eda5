"""ResNet-18/34/50/101 backbone returning C2..C5, laid out like torchvision's ResNet.

Matches mmdetection v1's `ResNet(style='pytorch')` used by the official SOLOv2:
  * stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool; PyTorch's symmetric padding is reproduced with
    explicit `ZeroPadding2D` + "valid" convs (Keras "same" pads stride-2 convs asymmetrically);
  * ResNet-50/101 bottlenecks put the stride on the 3x3 conv ("pytorch" style);
  * BatchNorm epsilon 1e-5, conv init kaiming-normal (fan_out), no bias in convs. BatchNorm is
    TensorFlow's fused kernel (`ops.FusedBatchNormalization`), whose moving variance takes
    the unbiased batch variance, as PyTorch's does.
Layer names are torchvision's module names (`conv1`, `bn1`, `layer2.0.downsample.0`, ...), which
is what `load_backbone_weights` relies on for `.npz` files.

Freezing:
  * `frozen_stages=k` freezes the stem and stages 1..k (mmdet semantics; -1 freezes nothing).
  * `norm_eval=True` makes every BatchNorm layer non-trainable, which in Keras also runs it in
    inference mode (moving statistics, never updated) even under `training=True`.
    Departure from the official code: mmdet's `norm_eval` freezes the statistics but leaves the
    BN scale/offset trainable in the unfrozen stages; here they are frozen too (detectron2
    `FrozenBN`, as AdelaiDet's SOLOv2 does).
  Setting `backbone.trainable = True` afterwards would unfreeze everything: rebuild instead.

Random init (no weights file): kaiming-normal convs, BN gamma 1 / beta 0. mmdet's
`zero_init_residual` (last BN gamma of each block = 0) is not applied: with frozen BN it would
switch every residual branch off for good. Frozen BN on a random backbone is the identity
(mean 0, var 1), so training from scratch should use `norm_eval=False, frozen_stages=-1`.
"""

import os

import keras
import numpy as np

from models import ops
from models.config import STANDARD_BACKBONE_WIDTH

# depth -> (residual block kind, blocks per stage)
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}


def _stage_widths(width: int) -> tuple[int, ...]:
    return tuple(width * 2**stage for stage in range(4))


def resnet_out_channels(depth: int, width: int = STANDARD_BACKBONE_WIDTH) -> tuple[int, ...]:
    """Channels of C2..C5: (64, 128, 256, 512) for basic blocks at the standard width, 4x
    that for bottlenecks; scaled by `width / 64`."""
    kind, _ = RESNET_SPECS[depth]
    return tuple(stage_width * _EXPANSION[kind] for stage_width in _stage_widths(width))


def _conv(x, filters, kernel_size, stride, name):
    """Conv with PyTorch padding `kernel_size // 2`, no bias, kaiming-normal fan_out init."""
    pad = kernel_size // 2
    padding = "same" if stride == 1 else "valid"
    if stride != 1 and pad > 0:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}.pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"
        ),
        name=name,
    )(x)


def _bn(x, name):
    # PyTorch BatchNorm2d: eps 1e-5, momentum 0.1 (= Keras momentum 0.9).
    return ops.FusedBatchNormalization(epsilon=1e-5, momentum=0.9, name=name)(x)


def _relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def _basic_block(x, width, stride, name):
    shortcut = x
    y = _relu(_bn(_conv(x, width, 3, stride, f"{name}.conv1"), f"{name}.bn1"), f"{name}.relu1")
    y = _bn(_conv(y, width, 3, 1, f"{name}.conv2"), f"{name}.bn2")
    if stride != 1 or x.shape[-1] != width:
        shortcut = _conv(x, width, 1, stride, f"{name}.downsample.0")
        shortcut = _bn(shortcut, f"{name}.downsample.1")
    return _relu(keras.layers.Add(name=f"{name}.add")([y, shortcut]), f"{name}.relu")


def _bottleneck_block(x, width, stride, name):
    out_channels = width * _EXPANSION["bottleneck"]
    shortcut = x
    y = _relu(_bn(_conv(x, width, 1, 1, f"{name}.conv1"), f"{name}.bn1"), f"{name}.relu1")
    y = _relu(_bn(_conv(y, width, 3, stride, f"{name}.conv2"), f"{name}.bn2"), f"{name}.relu2")
    y = _bn(_conv(y, out_channels, 1, 1, f"{name}.conv3"), f"{name}.bn3")
    if stride != 1 or x.shape[-1] != out_channels:
        shortcut = _conv(x, out_channels, 1, stride, f"{name}.downsample.0")
        shortcut = _bn(shortcut, f"{name}.downsample.1")
    return _relu(keras.layers.Add(name=f"{name}.add")([y, shortcut]), f"{name}.relu")


@keras.saving.register_keras_serializable(package="solov2")
class ResNetBackbone(keras.Model):
    """ResNet feature extractor: images `[B, H, W, 3]` -> `[C2, C3, C4, C5]`.

    C2..C5 have strides 4, 8, 16, 32 and `resnet_out_channels(depth, width)` channels.

    Args:
      depth: 18, 34, 50 or 101.
      frozen_stages: -1 (nothing frozen), 0 (stem) or k in 1..4 (stem and stages 1..k).
      norm_eval: freeze every BatchNorm (inference mode, non-trainable).
      width: channels of the stem and stage 1 (each later stage doubles them). The standard
        ResNet, and every ImageNet weights file, has 64; a narrower one (e.g. 32, a quarter
        of the convolutions' cost) is not a torchvision ResNet and trains from scratch only.
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        width: int = STANDARD_BACKBONE_WIDTH,
        **kwargs,
    ):
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        kwargs.setdefault("name", f"resnet{depth}")
        kind, blocks_per_stage = RESNET_SPECS[depth]
        block = _basic_block if kind == "basic" else _bottleneck_block

        images = keras.Input(shape=(None, None, 3), name="images")
        x = _relu(_bn(_conv(images, width, 7, 2, "conv1"), "bn1"), "relu")
        x = keras.layers.ZeroPadding2D(1, name="maxpool.pad")(x)  # inputs >= 0 after ReLU
        x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
        features = []
        for stage, (stage_width, num_blocks) in enumerate(
            zip(_stage_widths(width), blocks_per_stage)
        ):
            for index in range(num_blocks):
                stride = 2 if index == 0 and stage > 0 else 1
                x = block(x, stage_width, stride, f"layer{stage + 1}.{index}")
            features.append(x)
        super().__init__(inputs=images, outputs=features, **kwargs)

        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.width = width
        self.out_channels = resnet_out_channels(depth, width)
        self._freeze()

    def _freeze(self):
        stem = ("conv1", "bn1")
        frozen_stages = tuple(f"layer{stage}." for stage in range(1, self.frozen_stages + 1))
        for layer in self.layers:
            in_frozen_stem = self.frozen_stages >= 0 and layer.name in stem
            if in_frozen_stem or (frozen_stages and layer.name.startswith(frozen_stages)):
                layer.trainable = False
            if self.norm_eval and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False

    def get_config(self):
        return {
            "name": self.name,
            "depth": self.depth,
            "frozen_stages": self.frozen_stages,
            "norm_eval": self.norm_eval,
            "width": self.width,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def load_backbone_weights(backbone: ResNetBackbone, path: str) -> None:
    """Loads ImageNet (or any) weights from a local file into `backbone`.

    Two formats, chosen by extension:
      * `*.weights.h5`: Keras weights of a `ResNetBackbone` of the same depth, i.e. the file
        written by `ResNetBackbone(depth=d).save_weights(path)`.
      * `*.npz`: a torchvision ResNet `state_dict` saved with NumPy, e.g.
        `np.savez(path, **{k: v.numpy() for k, v in torchvision.models.resnet50(
        weights="IMAGENET1K_V1").state_dict().items()})` (the official SOLOv2 starts from
        `torchvision://resnet50`). Conv weights are OIHW and are transposed to HWIO; BN
        `weight, bias, running_mean, running_var` map to `gamma, beta, moving_mean,
        moving_variance`; `fc.*` and `num_batches_tracked` are ignored. Every backbone
        weight must be present with the right shape, otherwise ValueError.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.endswith(".weights.h5"):
        backbone.load_weights(path)
    elif path.endswith(".npz"):
        with np.load(path) as archive:
            _assign_torchvision_state(backbone, dict(archive.items()))
    else:
        raise ValueError(f"backbone weights must be a .weights.h5 or .npz file, got {path}")


def _assign_torchvision_state(backbone: ResNetBackbone, state: dict) -> None:
    unused = {key for key in state if not key.startswith("fc.")}
    unused -= {key for key in unused if key.endswith("num_batches_tracked")}
    problems, assignments = [], []
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Conv2D):
            suffixes, transpose = ("weight",), (2, 3, 1, 0)  # OIHW -> HWIO
        elif isinstance(layer, keras.layers.BatchNormalization):
            suffixes, transpose = ("weight", "bias", "running_mean", "running_var"), None
        else:
            continue
        values = []
        for suffix, variable in zip(suffixes, layer.weights):
            key = f"{layer.name}.{suffix}"
            if key not in state:
                problems.append(f"missing {key}")
                continue
            value = state[key] if transpose is None else np.transpose(state[key], transpose)
            if tuple(value.shape) != tuple(variable.shape):
                problems.append(f"{key}: shape {value.shape} != expected {tuple(variable.shape)}")
            values.append(value)
            unused.discard(key)
        assignments.append((layer, values))
    problems += [f"unexpected {key}" for key in sorted(unused)]
    if problems:
        raise ValueError(
            "torchvision ResNet weights do not match the backbone: " + "; ".join(problems)
        )
    for layer, values in assignments:  # only once everything matched: no partial loads
        layer.set_weights(values)
