"""Tiny SoloTargetGen-style training data and configs for trainer and export tests.

`build_training_examples` runs the real chain on demo images: `generate_demo_dataset` ->
CocoExampleGen executor (Beam) -> `TargetMaker.add_targets` -> gzip TFRecords in an Examples-like
folder (`Split-train/`, `Split-eval/`, `category_map.json`), exactly what the Trainer receives.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from components.solo_targets.transform import TargetMaker, TargetSpec
from models.config import DEMO_SCALE_RANGES, ExperimentConfig, get_experiment
from pipeline.demo_data import generate_demo_dataset
from schemas import features
from tests.example_gen_utils import read_examples, run_example_gen


def tiny_config(size: int = 128, norm_eval: bool = False, **train_overrides) -> ExperimentConfig:
    """demo_cpu shrunk for 2 CPU cores: 64/32-channel heads, GN(8), input `size` max.

    The demo scale ranges (defined at short side 256) are scaled to `size`.

    BatchNorm trains as in demo_cpu (random init) unless `norm_eval` (official: frozen BN, which
    multi-replica parity tests need: per-replica batch statistics differ from the global batch's).
    """
    base = get_experiment("demo_cpu")
    model = dataclasses.replace(
        base.model,
        fpn_channels=64,
        head_channels=64,
        kernel_channels=32,
        mask_mid_channels=32,
        norm_groups=8,
        norm_eval=norm_eval,
        scale_ranges=tuple((lo * size / 256, hi * size / 256) for lo, hi in DEMO_SCALE_RANGES),
        image_short_side=size,
        image_max_size=size,
    )
    train = dataclasses.replace(
        base.train,
        **{
            "batch_size": 4,
            "train_short_sides": (size,),
            "train_max_size": size,
            "warmup_iters": 0,
            # The recipe these tests were tuned on (the session-2 demo recipe): SGD, float32.
            "optimizer": "sgd",
            "base_lr": 0.08,
            "weight_decay": 1e-4,
            "mixed_precision": None,
            **train_overrides,
        },
    )
    return ExperimentConfig(model, train).validate()


def build_training_examples(
    root: str, config: ExperimentConfig, *, num_train: int = 4, num_val: int = 2, seed: int = 0
) -> str:
    """Writes demo data and its SOLO-target examples under `root`; returns the Examples dir.

    The Examples dir holds `Split-train/data_tfrecord-00000-of-00001.gz`, `Split-eval/...` and
    `category_map.json`, as the SoloTargetGen artifact does.
    """
    coco_dir = os.path.join(root, "coco")
    generate_demo_dataset(coco_dir, num_train=num_train, num_val=num_val, seed=seed)
    example_gen = run_example_gen(
        coco_dir,
        os.path.join(root, "example_gen"),
        split_files={
            "train": "annotations/instances_train.json",
            "eval": "annotations/instances_val.json",
        },
    )
    out_dir = os.path.join(root, "targets")
    for split in ("train", "eval"):
        maker = TargetMaker(TargetSpec.from_config(config, split))
        split_dir = os.path.join(out_dir, f"Split-{split}")
        os.makedirs(split_dir, exist_ok=True)
        path = os.path.join(split_dir, "data_tfrecord-00000-of-00001.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for example in read_examples(example_gen.uri, split):
                with_targets, _ = maker.add_targets(example)
                writer.write(with_targets.SerializeToString())
    tf.io.gfile.copy(
        os.path.join(example_gen.uri, features.CATEGORY_MAP_FILENAME),
        os.path.join(out_dir, features.CATEGORY_MAP_FILENAME),
    )
    return out_dir


def shared_training_examples(tmp_path_factory) -> str:
    """The Examples dir for `tiny_config(flip_prob=0)`, built once per pytest session.

    Cached under the session's base temp dir, so test modules that each call this from a
    module-scoped fixture share one build.
    """
    root = tmp_path_factory.getbasetemp() / "solov2_training_examples"
    done = root / "done"
    if not done.exists():
        examples_dir = build_training_examples(str(root), tiny_config(flip_prob=0.0))
        done.write_text(examples_dir)
    return done.read_text()


def tiny_overrides(config: ExperimentConfig) -> dict:
    """run_fn `overrides` (JSON-safe) that turn demo_cpu into `config`."""
    base = get_experiment("demo_cpu")

    def as_json(value):
        return [as_json(v) for v in value] if isinstance(value, tuple) else value

    return {
        part: {
            key: as_json(value)
            for key, value in dataclasses.asdict(getattr(config, part)).items()
            if value != dataclasses.asdict(getattr(base, part))[key]
        }
        for part in ("model", "train")
    }


def encoded_images(examples: list[tf.train.Example]) -> list[bytes]:
    return [e.features.feature[features.IMAGE_ENCODED].bytes_list.value[0] for e in examples]


def read_category_map(examples_dir: str) -> list[dict]:
    with open(os.path.join(examples_dir, features.CATEGORY_MAP_FILENAME)) as f:
        return json.load(f)["categories"]


def read_split(examples_dir: str, split: str) -> list[tf.train.Example]:
    return read_examples(examples_dir, split)
