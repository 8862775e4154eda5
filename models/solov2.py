"""SOLOv2 model (backbone + FPN + instance head + mask-feature branch) and its builder."""

import logging

import keras

from models.backbone import ResNetBackbone, load_backbone_weights
from models.config import ModelConfig
from models.fpn import FPN
from models.heads import SOLOv2InstanceHead
from models.mask_feature import MaskFeatureHead

_LOGGER = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="solov2")
class SOLOv2(keras.Model):
    """Dynamic SOLO. `call(images, training=False)` returns the dict of docs/CONTRACT.md.

    Args:
      backbone: maps images `[B, H, W, 3]` to `[C2, C3, C4, C5]`; must expose `out_channels`.
      fpn: `[C2..C5]` -> `[P2..P6]`.
      instance_head: `[P2..P6]` -> {"category_logits" `[B, cells, C]`, "kernels" `[B, cells, E]`}.
      mask_feature_head: `[P2..P5]` -> `[B, H/4, W/4, E]`.

    Images must be normalised and padded to multiples of 32 (see the contract).
    """

    def __init__(self, backbone, fpn, instance_head, mask_feature_head, **kwargs):
        kwargs.setdefault("name", "solov2")
        super().__init__(**kwargs)
        self.backbone = backbone
        self.fpn = fpn
        self.instance_head = instance_head
        self.mask_feature_head = mask_feature_head

    def build(self, input_shape):
        # Sub-layers restored by `from_config` arrive already built.
        batch = input_shape[0]
        pyramid_shapes = [(batch, None, None, self.fpn.channels)] * 5
        if not self.fpn.built:
            self.fpn.build([(batch, None, None, c) for c in self.backbone.out_channels])
        if not self.instance_head.built:
            self.instance_head.build(pyramid_shapes)
        if not self.mask_feature_head.built:
            self.mask_feature_head.build(pyramid_shapes[:4])
        self.built = True

    def call(self, images, training=False):
        """images `[B, H, W, 3]` -> {"category_logits", "kernels", "mask_features"}."""
        pyramid = self.fpn(self.backbone(images, training=training))
        outputs = dict(self.instance_head(pyramid))
        outputs["mask_features"] = self.mask_feature_head(pyramid[:4])
        return outputs

    def get_config(self):
        config = super().get_config()
        for name in ("backbone", "fpn", "instance_head", "mask_feature_head"):
            config[name] = keras.saving.serialize_keras_object(getattr(self, name))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("backbone", "fpn", "instance_head", "mask_feature_head"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def build_model(config: ModelConfig) -> SOLOv2:
    """The one place that maps a `ModelConfig` onto layer arguments. Returns a built model.

    Loads `config.backbone_weights` into the backbone when set (see `load_backbone_weights`).
    """
    config.validate()
    backbone = ResNetBackbone(
        depth=config.backbone_depth,
        frozen_stages=config.frozen_stages,
        norm_eval=config.norm_eval,
        width=config.backbone_width,
        name="backbone",
    )
    if config.backbone_weights:
        load_backbone_weights(backbone, config.backbone_weights)
    elif config.norm_eval or config.frozen_stages >= 0:
        # The official recipes start from ImageNet weights; frozen random layers never learn.
        _LOGGER.warning(
            "No backbone_weights: the %s backbone starts from random values, yet it is partly "
            "frozen as in the official recipe (frozen_stages=%d, norm_eval=%s). Give ImageNet "
            "weights (README, 'Pretrained backbone weights') or set frozen_stages=-1 and "
            "norm_eval=False.",
            config.backbone,
            config.frozen_stages,
            config.norm_eval,
        )
    model = SOLOv2(
        backbone=backbone,
        fpn=FPN(channels=config.fpn_channels, name="fpn"),
        instance_head=SOLOv2InstanceHead(
            num_classes=config.num_classes,
            grids=config.grids,
            num_convs=config.head_convs,
            channels=config.head_channels,
            category_channels=config.category_head_channels,
            kernel_channels=config.kernel_channels,
            norm_groups=config.norm_groups,
            name="instance_head",
        ),
        mask_feature_head=MaskFeatureHead(
            mid_channels=config.mask_mid_channels,
            out_channels=config.kernel_channels,
            norm_groups=config.norm_groups,
            name="mask_feature_head",
        ),
        name="solov2",
    )
    model.build((None, None, None, 3))
    return model
