"""`create_pipeline` wiring that needs no run: what each component is given."""

from __future__ import annotations

import json

from pipeline import configs
from pipeline.pipeline import DataSpec, TrainingSpec, create_pipeline


def _components(tmp_path, custom_config) -> dict:
    pipeline = create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=str(tmp_path / "root"),
        data=DataSpec(root=str(tmp_path / "coco"), single_file="annotations/instances.json"),
        serving_dir=str(tmp_path / "serving"),
        training=TrainingSpec(custom_config=custom_config),
    )
    return {component.id: component for component in pipeline.components}


def test_geometry_overrides_reach_the_targets_and_the_trainer(tmp_path):
    overrides = {
        "model": {"fpn_channels": 32, "sigma": 0.25},
        "train": {"base_lr": 0.002, "train_short_sides": [224, 256]},
    }
    nodes = _components(tmp_path, {"overrides": overrides})
    targets = nodes["SoloTargetGen"].exec_properties
    assert json.loads(targets["target_overrides"]) == {
        "model": {"sigma": 0.25},
        "train": {"train_short_sides": [224, 256]},
    }
    trainer_config = json.loads(nodes["Trainer"].exec_properties["custom_config"])
    assert trainer_config["overrides"] == overrides
    assert trainer_config["experiment"] == configs.DEFAULT_EXPERIMENT


def test_training_only_overrides_leave_the_targets_parameters_unchanged(tmp_path):
    """What keeps SoloTargetGen cached when only the recipe or the widths change."""
    plain = _components(tmp_path, {})["SoloTargetGen"].exec_properties
    recipe = _components(
        tmp_path, {"overrides": {"model": {"fpn_channels": 32}, "train": {"base_lr": 0.002}}}
    )["SoloTargetGen"].exec_properties
    assert plain == recipe
    assert plain["target_overrides"] == "{}"
