import dataclasses

import pytest

from models import config as cfg

EXPECTED_NAMES = {
    "solov2_r50_fpn_1x",
    "solov2_r50_fpn_3x",
    "solov2_r101_fpn",
    "solov2_light_448_r18",
    "solov2_light_448_r34",
    "solov2_light_448_r50",
    "demo_cpu",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_every_named_experiment_validates(name):
    experiment = cfg.get_experiment(name)
    assert experiment.validate() is experiment
    assert experiment.model.num_cells == 3872
    assert experiment.model.level_offsets == (0, 1600, 2896, 3472, 3728)


def test_registry_is_exactly_the_named_experiments():
    assert set(cfg.EXPERIMENTS) == EXPECTED_NAMES


def test_unknown_experiment_lists_known_names():
    with pytest.raises(KeyError, match="solov2_r50_fpn_1x.*") as error:
        cfg.get_experiment("solov2_r50_fpn_2x")
    assert all(name in str(error.value) for name in EXPECTED_NAMES)


def test_defaults_are_the_official_r50_1x_values():
    experiment = cfg.get_experiment("solov2_r50_fpn_1x")
    model, train = experiment.model, experiment.train
    assert (model.backbone, model.backbone_depth, model.frozen_stages, model.norm_eval) == (
        "resnet50",
        50,
        1,
        True,
    )
    assert (model.fpn_channels, model.head_convs, model.head_channels) == (256, 4, 512)
    assert (model.kernel_channels, model.mask_mid_channels, model.num_classes) == (256, 128, 80)
    assert model.grids == (40, 36, 24, 16, 12) and model.strides == (8, 8, 16, 32, 32)
    assert model.scale_ranges == ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    assert model.sigma == 0.2
    inference = (
        model.score_threshold,
        model.mask_threshold,
        model.nms_pre,
        model.update_threshold,
        model.max_detections,
        model.nms_kernel,
        model.nms_sigma,
    )
    assert inference == (0.1, 0.5, 500, 0.05, 100, "gaussian", 2.0)
    assert (model.image_short_side, model.image_max_size) == (800, 1333)
    assert (train.batch_size, train.base_lr, train.momentum, train.weight_decay) == (
        16,
        0.01,
        0.9,
        1e-4,
    )
    assert (train.warmup_iters, train.warmup_ratio, train.grad_clip_norm) == (500, 0.01, 35.0)
    assert (train.schedule, train.lr_steps, train.epochs) == ("step", (9, 11), 12)
    assert (train.train_short_sides, train.train_max_size, train.flip_prob) == ((800,), 1333, 0.5)


def test_3x_and_r101_use_multiscale_36_epochs():
    for name, backbone in [("solov2_r50_fpn_3x", "resnet50"), ("solov2_r101_fpn", "resnet101")]:
        experiment = cfg.get_experiment(name)
        assert experiment.model.backbone == backbone
        assert experiment.train.train_short_sides == (800, 768, 736, 704, 672, 640)
        assert experiment.train.train_max_size == 1333
        assert (experiment.train.epochs, experiment.train.lr_steps) == (36, (27, 33))
    # 1x and 3x differ in the recipe only: the same model (so it is built once in test_model.py).
    r50_1x, r50_3x = (
        cfg.get_experiment("solov2_r50_fpn_1x"),
        cfg.get_experiment("solov2_r50_fpn_3x"),
    )
    assert r50_3x.model == r50_1x.model and r50_3x.train != r50_1x.train
    r101 = cfg.get_experiment("solov2_r101_fpn").model
    assert r101 == dataclasses.replace(r50_1x.model, backbone="resnet101")


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_light_448_variants(depth):
    experiment = cfg.get_experiment(f"solov2_light_448_r{depth}")
    model, train = experiment.model, experiment.train
    assert model.backbone_depth == depth
    assert (model.head_convs, model.head_channels, model.kernel_channels) == (2, 256, 128)
    assert model.mask_mid_channels == 128
    assert model.scale_ranges == ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
    assert (model.image_short_side, model.image_max_size) == (448, 768)
    # Official light configs train on shorter sides 352..512 (test at 448), max side 768.
    assert train.train_short_sides == (512, 480, 448, 416, 384, 352)
    assert (train.train_max_size, train.epochs, train.lr_steps) == (768, 36, (27, 33))


def test_demo_cpu_departs_only_where_documented():
    demo = cfg.get_experiment("demo_cpu")
    official = cfg.get_experiment("solov2_r50_fpn_1x")
    changed = {
        field.name
        for field in dataclasses.fields(cfg.ModelConfig)
        if getattr(demo.model, field.name) != getattr(official.model, field.name)
    }
    assert changed == {
        "backbone",
        "backbone_width",
        "fpn_channels",
        "head_convs",
        "head_channels",
        "kernel_channels",
        "mask_mid_channels",
        "num_classes",
        "category_loss_weight",
        "frozen_stages",
        "norm_eval",
        "scale_ranges",
        "image_short_side",
        "image_max_size",
    }
    assert (demo.model.backbone, demo.model.num_classes) == ("resnet18", 5)
    # Half torchvision's width: the demo trains from scratch; every official config keeps 64.
    assert (demo.model.backbone_width, official.model.backbone_width) == (32, 64)
    assert (demo.model.frozen_stages, demo.model.norm_eval) == (-1, False)
    assert (demo.model.fpn_channels, demo.model.head_convs, demo.model.head_channels) == (64, 2, 64)
    assert (demo.model.kernel_channels, demo.model.mask_mid_channels) == (32, 32)
    # Classes are learned later than masks from random init; see the demo_cpu docstring.
    assert (demo.model.category_loss_weight, official.model.category_loss_weight) == (6.0, 1.0)
    assert demo.model.scale_ranges == ((1, 32), (16, 64), (32, 128), (64, 256), (128, 512))
    # Multi-scale training below the 256 test scale, as the official 3x recipe below 800.
    assert (demo.train.train_short_sides, demo.train.train_max_size) == ((224, 240, 256), 352)
    assert max(demo.train.train_short_sides) == demo.model.image_short_side
    # The demo recipe's documented departures: AdamW, bfloat16 where native; official: SGD, fp32.
    assert (demo.train.optimizer, demo.train.mixed_precision) == ("adamw", "auto")
    assert (official.train.optimizer, official.train.mixed_precision) == ("sgd", None)
    assert demo.train.learning_rate == pytest.approx(1e-3)
    assert "NOT an official variant" in cfg.demo_cpu.__doc__


def test_configs_are_frozen():
    model = cfg.ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.num_classes = 3


def test_learning_rate_scales_linearly_with_batch():
    assert cfg.TrainConfig().learning_rate == pytest.approx(0.01)
    assert cfg.TrainConfig(batch_size=4).learning_rate == pytest.approx(0.0025)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"backbone": "resnet152"}, "backbone"),
        ({"grids": (40, 36, 24, 16)}, "5 entries"),
        ({"scale_ranges": cfg.OFFICIAL_SCALE_RANGES[:4]}, "5 entries"),
        ({"strides": (4, 8, 16, 32, 64)}, "strides"),
        ({"grids": (12, 16, 24, 36, 40)}, "non-increasing"),
        ({"head_channels": 100}, "head_channels"),
        ({"category_head_channels": 48}, "category_head_channels"),
        ({"kernel_channels": 48}, "kernel_channels"),
        ({"mask_mid_channels": 0}, "mask_mid_channels"),
        ({"scale_ranges": ((1, 96), (100, 192), (96, 384), (192, 768), (384, 2048))}, "increasing"),
        ({"scale_ranges": ((1, 96), (97, 192), (150, 384), (192, 768), (384, 2048))}, "gap"),
        (
            {"scale_ranges": ((96, 1), (48, 192), (96, 384), (192, 768), (384, 2048))},
            "lower < upper",
        ),
        ({"score_threshold": 0.0}, "score_threshold"),
        ({"mask_threshold": 1.0}, "mask_threshold"),
        ({"update_threshold": 1.5}, "update_threshold"),
        ({"sigma": 0.0}, "sigma"),
        ({"nms_kernel": "hard"}, "nms_kernel"),
        ({"max_detections": 600}, "max_detections"),
        ({"image_short_side": 1400}, "image_short_side"),
        ({"frozen_stages": 5}, "frozen_stages"),
        ({"backbone_width": 0}, "backbone_width"),
        ({"backbone_width": 32, "backbone_weights": "r18.npz"}, "need backbone_width 64"),
    ],
)
def test_model_validate_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg.ModelConfig(), **changes).validate()


def test_validate_lists_every_problem_at_once():
    bad = dataclasses.replace(cfg.ModelConfig(), head_channels=100, nms_kernel="hard")
    with pytest.raises(ValueError, match="head_channels.*nms_kernel"):
        bad.validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr_steps": (9, 12)}, "lr_steps"),
        ({"lr_steps": (11, 9)}, "lr_steps"),
        ({"schedule": "cosine"}, "empty for the cosine"),
        ({"schedule": "poly"}, "schedule"),
        ({"warmup_ratio": 0.0}, "warmup_ratio"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
        ({"train_short_sides": (800, 1400)}, "train_short_sides"),
        ({"train_short_sides": ()}, "train_short_sides"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_train_validate_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg.TrainConfig(), **changes).validate()


def test_cosine_schedule_without_steps_and_no_clipping_are_valid():
    cfg.TrainConfig(schedule="cosine", lr_steps=(), grad_clip_norm=None).validate()


def test_experiment_validate_checks_ranges_cover_the_image():
    experiment = cfg.get_experiment("demo_cpu")
    too_big = dataclasses.replace(
        experiment, train=dataclasses.replace(experiment.train, train_max_size=1333)
    )
    with pytest.raises(ValueError, match="assigned to no level"):
        too_big.validate()


def test_apply_overrides_turns_json_lists_into_tuples():
    base = cfg.get_experiment("demo_cpu")
    changed = cfg.apply_overrides(
        base,
        {
            "model": {"scale_ranges": [[1, 32], [16, 64], [32, 128], [64, 256], [128, 600]]},
            "train": {"train_short_sides": [224, 256]},
        },
    )
    assert changed.model.scale_ranges[-1] == (128, 600)
    assert changed.train.train_short_sides == (224, 256)
    assert cfg.apply_overrides(base, None) == base
    with pytest.raises(ValueError, match="overrides keys"):
        cfg.apply_overrides(base, {"optimizer": {}})
    with pytest.raises(TypeError, match="not_a_field"):
        cfg.apply_overrides(base, {"model": {"not_a_field": 1}})
    with pytest.raises(ValueError, match="train_short_sides"):
        cfg.apply_overrides(base, {"train": {"train_short_sides": [400]}})


def test_target_fields_are_config_fields():
    for section, config_class in (("model", cfg.ModelConfig), ("train", cfg.TrainConfig)):
        names = {field.name for field in dataclasses.fields(config_class)}
        assert set(cfg.TARGET_FIELDS[section]) <= names


def test_select_target_overrides_keeps_only_what_shapes_targets():
    overrides = {
        "model": {"sigma": 0.3, "fpn_channels": 32},
        "train": {"base_lr": 0.1, "train_short_sides": [224]},
    }
    assert cfg.select_target_overrides(overrides) == {
        "model": {"sigma": 0.3},
        "train": {"train_short_sides": [224]},
    }
    assert cfg.select_target_overrides({"train": {"base_lr": 0.1}}) == {}
    assert cfg.select_target_overrides(None) == {}
