"""Experiment configs: frozen dataclasses plus a plain dict of named experiments.

Defaults are the official SOLOv2 R50 1x values (WXinlong/SOLO
`configs/solov2/solov2_r50_fpn_8gpu_1x.py`). Layers never import this module; only
`models.solov2.build_model` maps a `ModelConfig` onto layer arguments.

GroupNorm: every GN uses `norm_groups` (32) groups; `validate()` requires the head, mask-branch
and kernel channels to be divisible by it. We do not fall back to `min(32, channels)`: the
`demo_cpu` widths (64, 64, 32, 32) are multiples of 32, so all named experiments use GN(32).
"""

import dataclasses
from collections.abc import Mapping

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# torchvision's ResNet stem and stage-1 width (every ImageNet weights file has it); each later
# stage doubles it.
STANDARD_BACKBONE_WIDTH = 64
NUM_LEVELS = 5
# Strides of the five head levels, fixed by the head's resampling (P2 x0.5, P3, P4, P5, P6 -> P5).
LEVEL_STRIDES = (8, 8, 16, 32, 32)
NMS_KERNELS = ("gaussian", "linear")
SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")
# Training precision: None / "float32", a Keras mixed policy, or "auto" (`models.train`).
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16", "auto")

OFFICIAL_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
LIGHT_SCALE_RANGES = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
DEMO_SCALE_RANGES = ((1, 32), (16, 64), (32, 128), (64, 256), (128, 512))
MULTISCALE_3X_SHORT_SIDES = (800, 768, 736, 704, 672, 640)
# demo_cpu's training scales: 224..256 for its 256 test scale (0.875..1 of it; the official 3x
# draws 0.8..1). All fit its 256-high orientation pad.
DEMO_SHORT_SIDES = (224, 240, 256)
LIGHT_SHORT_SIDES = (512, 480, 448, 416, 384, 352)


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"invalid {what}: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, target assignment, loss and inference settings of one SOLOv2 model."""

    # Backbone + FPN.
    backbone: str = "resnet50"
    backbone_weights: str | None = None  # local .weights.h5 or .npz, see load_backbone_weights
    # Stem and stage-1 channels, doubled by each later stage. Narrower than the standard 64 is a
    # demo-only departure (`demo_cpu`) that trains from scratch.
    backbone_width: int = STANDARD_BACKBONE_WIDTH
    frozen_stages: int = 1  # stem + stage 1
    norm_eval: bool = True  # all BatchNorm frozen
    fpn_channels: int = 256
    # Instance head and mask-feature branch.
    num_classes: int = 80  # no background channel
    head_convs: int = 4
    head_channels: int = 512
    category_head_channels: int | None = None  # category tower alone; None = head_channels
    kernel_channels: int = 256  # E: 1x1 dynamic kernel size = mask-feature channels
    mask_mid_channels: int = 128
    norm_groups: int = 32
    # Grid assignment (targets).
    grids: tuple[int, ...] = (40, 36, 24, 16, 12)
    strides: tuple[int, ...] = LEVEL_STRIDES
    scale_ranges: tuple[tuple[float, float], ...] = OFFICIAL_SCALE_RANGES
    sigma: float = 0.2  # centre-region scale
    # Losses: focal (category) + Dice (mask).
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    category_loss_weight: float = 1.0
    mask_loss_weight: float = 3.0
    # Test-time resize (keep ratio): shorter side, cap on the longer side.
    image_short_side: int = 800
    image_max_size: int = 1333
    # Inference: score filter, point NMS, maskness, Matrix NMS.
    score_threshold: float = 0.1
    mask_threshold: float = 0.5
    nms_pre: int = 500
    update_threshold: float = 0.05
    max_detections: int = 100
    nms_kernel: str = "gaussian"
    nms_sigma: float = 2.0

    @property
    def backbone_depth(self) -> int:
        """ResNet depth parsed from `backbone` ("resnet50" -> 50)."""
        return int(self.backbone.removeprefix("resnet"))

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Flat index of each level's first cell (official grids: 0, 1600, 2896, 3472, 3728)."""
        offsets, total = [], 0
        for grid in self.grids:
            offsets.append(total)
            total += grid * grid
        return tuple(offsets)

    @property
    def num_cells(self) -> int:
        """Grid cells over all levels (official grids: 3872)."""
        return sum(grid * grid for grid in self.grids)

    def validate(self) -> "ModelConfig":
        """Checks cross-field constraints; returns self, raises ValueError listing every problem."""
        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"backbone {self.backbone!r} not in {BACKBONES}")
        if not -1 <= self.frozen_stages <= 4:
            problems.append(f"frozen_stages {self.frozen_stages} not in [-1, 4]")
        if self.backbone_width < 1:
            problems.append(f"backbone_width {self.backbone_width} must be >= 1")
        torchvision_weights = (self.backbone_weights or "").endswith(".npz")
        if torchvision_weights and self.backbone_width != STANDARD_BACKBONE_WIDTH:
            problems.append(
                f"torchvision backbone_weights need backbone_width {STANDARD_BACKBONE_WIDTH}, "
                f"got {self.backbone_width}"
            )
        lengths = {len(self.grids), len(self.strides), len(self.scale_ranges)}
        if lengths != {NUM_LEVELS}:
            problems.append(
                f"grids, strides and scale_ranges need {NUM_LEVELS} entries each, got "
                f"{len(self.grids)}, {len(self.strides)}, {len(self.scale_ranges)}"
            )
        if tuple(self.strides) != LEVEL_STRIDES:
            problems.append(
                f"strides must be {LEVEL_STRIDES} (set by the head), got {self.strides}"
            )
        if any(grid <= 0 for grid in self.grids) or list(self.grids) != sorted(
            self.grids, reverse=True
        ):
            problems.append(f"grids must be positive and non-increasing, got {self.grids}")
        problems += _scale_range_problems(self.scale_ranges)
        for name in (
            "head_channels",
            "category_head_channels",
            "mask_mid_channels",
            "kernel_channels",
        ):
            channels = getattr(self, name)
            if channels is None:  # category_head_channels: the shared head width
                continue
            if channels <= 0 or channels % self.norm_groups:
                problems.append(
                    f"{name}={channels} not a positive multiple of GN groups {self.norm_groups}"
                )
        for name in ("fpn_channels", "num_classes", "head_convs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0 < self.sigma <= 1:
            problems.append(f"sigma {self.sigma} not in (0, 1]")
        for name in ("score_threshold", "mask_threshold", "update_threshold", "focal_alpha"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} not in (0, 1)")
        if self.focal_gamma < 0 or self.category_loss_weight <= 0 or self.mask_loss_weight <= 0:
            problems.append("focal_gamma must be >= 0 and loss weights > 0")
        if not 1 <= self.max_detections <= self.nms_pre:
            problems.append(
                f"need 1 <= max_detections ({self.max_detections}) <= nms_pre ({self.nms_pre})"
            )
        if self.nms_kernel not in NMS_KERNELS:
            problems.append(f"nms_kernel {self.nms_kernel!r} not in {NMS_KERNELS}")
        if self.nms_sigma <= 0:
            problems.append("nms_sigma must be > 0")
        if not 0 < self.image_short_side <= self.image_max_size:
            problems.append(
                f"need 0 < image_short_side ({self.image_short_side}) <= image_max_size ({self.image_max_size})"
            )
        _raise_if(problems, "ModelConfig")
        return self


def _scale_range_problems(scale_ranges) -> list[str]:
    """Ranges must be non-empty, ordered, and overlap or touch so every scale has a level."""
    problems = []
    for lower, upper in scale_ranges:
        if not 0 <= lower < upper:
            problems.append(f"scale range ({lower}, {upper}) needs 0 <= lower < upper")
    for (lower, upper), (next_lower, next_upper) in zip(scale_ranges, scale_ranges[1:]):
        if not (lower < next_lower and upper < next_upper):
            problems.append(
                f"scale ranges not increasing: ({lower}, {upper}) -> ({next_lower}, {next_upper})"
            )
        if next_lower > upper:
            problems.append(
                f"gap between scale ranges ({lower}, {upper}) and ({next_lower}, {next_upper})"
            )
    return problems


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (official: SGD, 8 GPUs x 2 images, step schedule in epochs)."""

    batch_size: int = 16
    base_lr: float = 0.01  # for `base_batch_size` images per step
    base_batch_size: int = 16
    optimizer: str = "sgd"  # official: "sgd"; "adamw" is a departure (see `demo_cpu`)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4  # SGD: coupled L2 (mmdet); AdamW: decoupled, times the lr
    warmup_iters: int = 500  # linear warmup from warmup_ratio * lr
    warmup_ratio: float = 0.01
    schedule: str = "step"  # "step" (x lr_decay at lr_steps) or "cosine" (lr_steps empty)
    lr_steps: tuple[int, ...] = (9, 11)  # epochs
    lr_decay: float = 0.1
    epochs: int = 12
    grad_clip_norm: float | None = 35.0  # global L2 norm; None disables clipping
    train_short_sides: tuple[int, ...] = (800,)  # one drawn uniformly per image
    train_max_size: int = 1333  # cap on the longer side (keep ratio)
    flip_prob: float = 0.5  # horizontal flip
    # Pad each training image to its orientation's rectangle (short pad x long pad, e.g.
    # 800x1344, or transposed) and batch one orientation at a time, as official batches are
    # grouped by aspect ratio and padded to their largest image; False: the square of
    # `padded_size(train_max_size)` (1344x1344), which costs up to 1.7x the convolutions on
    # 4:3 COCO images. Serving and evaluation pad to the square either way.
    orientation_pad: bool = True
    # Official: float32. "auto": bfloat16 where the hardware computes it natively (TPU, or a CPU
    # with AVX512-BF16 / AMX), else float32; see `models.train.resolve_mixed_precision`.
    mixed_precision: str | None = None

    @property
    def learning_rate(self) -> float:
        """`base_lr` scaled linearly to `batch_size` (official: 0.01 at 16 images)."""
        return self.base_lr * self.batch_size / self.base_batch_size

    def validate(self) -> "TrainConfig":
        """Checks the recipe; returns self, raises ValueError listing every problem."""
        problems = []
        if self.batch_size < 1 or self.base_batch_size < 1 or self.epochs < 1:
            problems.append("batch_size, base_batch_size and epochs must be >= 1")
        if self.base_lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            problems.append("need base_lr > 0, weight_decay >= 0, 0 <= momentum < 1")
        if self.warmup_iters < 0 or not 0 < self.warmup_ratio <= 1:
            problems.append("need warmup_iters >= 0 and warmup_ratio in (0, 1]")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} not in {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} not in {SCHEDULES}")
        elif self.schedule == "step":
            steps = list(self.lr_steps)
            if (
                not steps
                or steps != sorted(set(steps))
                or not 0 < steps[0] <= steps[-1] < self.epochs
            ):
                problems.append(
                    f"lr_steps {self.lr_steps} must increase strictly within (0, {self.epochs})"
                )
            if not 0 < self.lr_decay < 1:
                problems.append(f"lr_decay {self.lr_decay} not in (0, 1)")
        elif self.lr_steps:
            problems.append("lr_steps must be empty for the cosine schedule")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            problems.append("grad_clip_norm must be > 0 or None")
        if not self.train_short_sides or not all(
            0 < side <= self.train_max_size for side in self.train_short_sides
        ):
            problems.append(
                f"train_short_sides {self.train_short_sides} must be non-empty, in (0, train_max_size]"
            )
        if self.mixed_precision not in PRECISIONS:
            problems.append(f"mixed_precision {self.mixed_precision!r} not in {PRECISIONS}")
        if not 0 <= self.flip_prob <= 1:
            problems.append(f"flip_prob {self.flip_prob} not in [0, 1]")
        _raise_if(problems, "TrainConfig")
        return self


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One named experiment: the model and its training recipe."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "ExperimentConfig":
        """Validates both parts, then constraints that span them; returns self."""
        self.model.validate()
        self.train.validate()
        problems = []
        largest_image = max(self.train.train_max_size, self.model.image_max_size)
        if self.model.scale_ranges[-1][1] < largest_image:
            problems.append(
                f"last scale range ends at {self.model.scale_ranges[-1][1]} < largest image side "
                f"{largest_image}: image-sized objects would be assigned to no level"
            )
        _raise_if(problems, "ExperimentConfig")
        return self


_SCHEDULE_3X = {"epochs": 36, "lr_steps": (27, 33)}


def solov2_r50_fpn_1x() -> ExperimentConfig:
    """Official SOLOv2 R50-FPN 1x (COCO val 34.8 mask AP): single scale (1333, 800), 12 epochs."""
    return ExperimentConfig(ModelConfig(), TrainConfig())


def solov2_r50_fpn_3x() -> ExperimentConfig:
    """Official SOLOv2 R50-FPN 3x (37.5 AP): shorter side in 640..800, 36 epochs, steps 27/33."""
    return ExperimentConfig(
        ModelConfig(), TrainConfig(train_short_sides=MULTISCALE_3X_SHORT_SIDES, **_SCHEDULE_3X)
    )


def solov2_r101_fpn() -> ExperimentConfig:
    """Official SOLOv2 R101-FPN 3x (39.1 AP)."""
    return ExperimentConfig(
        ModelConfig(backbone="resnet101"),
        TrainConfig(train_short_sides=MULTISCALE_3X_SHORT_SIDES, **_SCHEDULE_3X),
    )


def _light_448(backbone: str) -> ExperimentConfig:
    """Official SOLOv2-Light-448: 2 x 256 head, E = 128, test (768, 448), train 352..512, 3x."""
    return ExperimentConfig(
        ModelConfig(
            backbone=backbone,
            head_convs=2,
            head_channels=256,
            kernel_channels=128,
            scale_ranges=LIGHT_SCALE_RANGES,
            image_short_side=448,
            image_max_size=768,
        ),
        TrainConfig(train_short_sides=LIGHT_SHORT_SIDES, train_max_size=768, **_SCHEDULE_3X),
    )


def solov2_light_448_r18() -> ExperimentConfig:
    """Official SOLOv2-Light-448 R18 (29.6 AP)."""
    return _light_448("resnet18")


def solov2_light_448_r34() -> ExperimentConfig:
    """Official SOLOv2-Light-448 R34 (32.0 AP)."""
    return _light_448("resnet34")


def solov2_light_448_r50() -> ExperimentConfig:
    """Official SOLOv2-Light-448 R50 (33.7 AP)."""
    return _light_448("resnet50")


def demo_cpu() -> ExperimentConfig:
    """NOT an official variant: a small model for CPU demos and end-to-end tests.

    ResNet-18 at half width (stages 32, 64, 128, 256), FPN 64, 2 x 64 head, E = 32, mask mid
    32, 5 classes (the demo dataset's shapes), images 256 (max 352) with scale ranges shrunk
    accordingly. It trains from random
    initialisation (no ImageNet weights can be downloaded here), so, unlike the official recipe,
    no stage is frozen and BatchNorm trains (`frozen_stages=-1`, `norm_eval=False`): frozen BN
    on a random backbone would leave it with no working normalisation at all. Its training
    recipe is sized for 2 CPU cores (see below). Every other value (grids, sigma, losses,
    inference thresholds) is the official one.

    Why these widths: at 352 px the 256-channel FPN output convs at P2 cost more than the whole
    ResNet-18. By a FLOP count, 64/64/32/32 widths make a step about 2.5x cheaper than the
    previous 256/128/64/64 (6.6 vs 16.6 GMAC per image forward), so the recipe affords 504
    steps instead of 216; on the demo val split mask AP went from 0.022 to 0.062
    (docs/experiments.md). The backbone then cost most of a step, so it is narrowed too
    (`backbone_width=32`, torchvision's is 64; it can no longer load ImageNet weights, which
    this config never had): a step is 0.61x as long (0.296 vs 0.488 s, one cached batch), and
    in the same training time (2208 steps instead of 1344) mask AP went from 0.302 / 0.302 /
    0.230 to 0.319 / 0.342 / 0.250 (seeds 0 / 1 / 2; class-agnostic 0.33 -> 0.38 on average).
    Width 16 (2976 steps) was worse: 0.250 at seed 0 (session 11, docs/experiments.md).

    Why AdamW and bfloat16 (departures from the official SGD, float32 recipe; demo only): from
    random initialisation and a 10-minute budget, AdamW at 1e-3 reached a lower loss than SGD
    at the same 504 steps (0.81 vs 0.90) and mask AP 0.084 vs 0.052-0.062. bfloat16 on a CPU
    with AVX512-BF16 made a step 0.76-0.85x as long, which pays for most of 648 steps;
    with both, mask AP 0.102 (docs/experiments.md). `mixed_precision="auto"` falls back to
    float32 on CPUs without native bfloat16.

    Why category_loss_weight 6 (official 1.0, with the Dice loss at 3): from random
    initialisation on this budget the masks are learned long before the classes (among the four
    filled shapes the class stayed near chance, so each object came out as several detections
    with one mask and different classes). Giving the focal loss more of the gradient fixed more
    of that than it cost the masks: on demo data 2.0, seeds 0 / 1, mask AP 0.159 / 0.144 at
    weight 1, 0.184 / 0.162 at 3, 0.219 / 0.204 at 6; at 12 (seed 0) the masks suffered and AP
    fell to 0.156 (docs/experiments.md, session 7).

    Why 2880 steps: the budget buys steps, and from random init AP still rises steeply with
    them (on demo data 2.0, seed 0: 0.219 at 864 steps, 0.390 at 1728). Cutting the Dice
    loss's positive buffer to the batch's positives made a step 0.82x as long (session 9:
    864 -> 1056 steps), and padding each training image to its orientation's rectangle
    (256x352 or 352x256) instead of the 352x352 square made it 0.77x as long again (session
    10: 1056 -> 1344 steps in the same training time), the half-width backbone 0.61x again
    (session 11: 1344 -> 2208 steps), and TensorFlow's fused BatchNorm with a faster GroupNorm
    (`models.ops`) 0.77x again (session 12: 2208 -> 2784 steps; docs/experiments.md).

    Why 15 epochs of the 768-image demo set (2880 steps, decays at epochs 12 and 14): with
    that many steps the 192-image set of sessions 6-12 (58 epochs) was memorised: mask AP
    0.71 on its own training images, where the classes cost nothing (class-agnostic AP also
    0.71), and 0.34 on val, where 140 of the 400 best detections had the wrong class. In
    the same 2784 steps, 384 images gave val AP 0.477 / 0.456, 768 images 0.471 / 0.519
    (seeds 0 / 1) and 1536 images 0.424 (seed 0; underfit), against 0.342 / 0.330 with 192
    (session 13, docs/experiments.md). The epochs count passes over the demo set, so on
    another set the same recipe is another number of steps.

    Why multi-scale training (`DEMO_SHORT_SIDES`, shorter side 224, 240 or 256 per image, as
    the official 3x recipe draws 640..800 for an 800 test scale): more kinds of training
    image for the same steps, at no cost per step (SoloTargetGen makes 6 target variants per
    image instead of 2, 6-13 s more in `make run`). Seeds 0 / 1 at 2880 steps: mask AP
    0.550 / 0.553 against 0.451 / 0.533 at the single scale (session 13, docs/experiments.md).
    """
    return ExperimentConfig(
        ModelConfig(
            backbone="resnet18",
            backbone_width=32,
            fpn_channels=64,
            head_convs=2,
            head_channels=64,
            kernel_channels=32,
            mask_mid_channels=32,
            num_classes=5,
            category_loss_weight=6.0,
            frozen_stages=-1,
            norm_eval=False,
            scale_ranges=DEMO_SCALE_RANGES,
            image_short_side=256,
            image_max_size=352,
        ),
        # A CPU recipe, not the official one (see the docstring): AdamW at 1e-3 for batch 4
        # (base 0.004 per 16 images), decoupled weight decay 0.05, short warmup, 15 epochs of
        # the 768-image demo set (2880 steps), decays at epochs 12 and 14, bfloat16 where the
        # CPU computes it natively, shorter side drawn from 224, 240 and 256 per image.
        TrainConfig(
            batch_size=4,
            optimizer="adamw",
            base_lr=0.004,
            weight_decay=0.05,
            warmup_iters=30,
            epochs=15,
            lr_steps=(12, 14),
            mixed_precision="auto",
            train_short_sides=DEMO_SHORT_SIDES,
            train_max_size=352,
        ),
    )


EXPERIMENTS = {
    "solov2_r50_fpn_1x": solov2_r50_fpn_1x,
    "solov2_r50_fpn_3x": solov2_r50_fpn_3x,
    "solov2_r101_fpn": solov2_r101_fpn,
    "solov2_light_448_r18": solov2_light_448_r18,
    "solov2_light_448_r34": solov2_light_448_r34,
    "solov2_light_448_r50": solov2_light_448_r50,
    "demo_cpu": demo_cpu,
}


def get_experiment(name: str) -> ExperimentConfig:
    """The named experiment, validated. KeyError lists the known names."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]().validate()


# The fields that SOLO targets depend on (SoloTargetGen materialises them ahead of training): an
# override of any of them must reach SoloTargetGen too, and no other override should, so that
# changing a training-only setting keeps the targets cached.
TARGET_FIELDS = {
    "model": ("grids", "scale_ranges", "sigma", "image_short_side", "image_max_size"),
    "train": ("train_short_sides", "train_max_size", "flip_prob", "orientation_pad"),
}


def apply_overrides(config: ExperimentConfig, overrides: Mapping | None) -> ExperimentConfig:
    """`config` with `overrides` `{"model": {...}, "train": {...}}` applied, validated.

    JSON lists become tuples (e.g. `train_short_sides`, `scale_ranges`). Unknown sections or
    fields raise (dataclasses.replace names the field).
    """
    overrides = overrides or {}
    unknown = set(overrides) - {"model", "train"}
    if unknown:
        raise ValueError(f"overrides keys must be 'model' and/or 'train', got {sorted(unknown)}")
    model = dataclasses.replace(config.model, **_tuples(overrides.get("model", {})))
    train = dataclasses.replace(config.train, **_tuples(overrides.get("train", {})))
    return ExperimentConfig(model, train).validate()


def select_target_overrides(overrides: Mapping | None) -> dict:
    """The part of `overrides` that changes SOLO targets (`TARGET_FIELDS`); sections kept only
    when non-empty, so no target override gives `{}`."""
    selected = {}
    for section, fields in TARGET_FIELDS.items():
        values = {k: v for k, v in (overrides or {}).get(section, {}).items() if k in fields}
        if values:
            selected[section] = values
    return selected


def _tuples(values: Mapping) -> dict:
    def convert(value):
        return tuple(convert(v) for v in value) if isinstance(value, (list, tuple)) else value

    return {key: convert(value) for key, value in values.items()}
