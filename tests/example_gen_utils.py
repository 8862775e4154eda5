"""Running CocoExampleGen's executor directly (real Beam, no orchestrator) and reading its output."""

from __future__ import annotations

import glob
import json
import os

import tensorflow as tf
from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
from tfx.types import standard_artifacts

from components.coco_example_gen.component import CocoExampleGen, executor_exec_properties
from components.coco_example_gen.executor import CocoExecutor
from schemas import features


def run_example_gen(
    input_base: str, out_dir: str, **component_kwargs
) -> standard_artifacts.Examples:
    """Runs CocoExecutor.Do with the exec properties the component would pass."""
    component = CocoExampleGen(input_base, **component_kwargs)
    exec_properties = executor_exec_properties(component)
    examples = standard_artifacts.Examples()
    examples.uri = out_dir
    context = BaseBeamExecutor.Context(
        beam_pipeline_args=["--direct_num_workers=1"], tmp_dir=os.path.join(out_dir, ".tmp")
    )
    CocoExecutor(context).Do({}, {"examples": [examples]}, exec_properties)
    return examples


def read_examples(examples_uri: str, split: str) -> list[tf.train.Example]:
    files = sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*.gz")))
    records = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in records]


def read_report(examples_uri: str) -> dict:
    with open(os.path.join(examples_uri, features.INGESTION_REPORT_FILENAME)) as f:
        return json.load(f)


def feature_values(example: tf.train.Example, key: str) -> list:
    feature = example.features.feature[key]
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []
