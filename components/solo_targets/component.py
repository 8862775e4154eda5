"""SoloTargetGen: Examples -> Examples with SOLO grid targets, same splits (Beam).

(No `from __future__ import annotations` here: the TFX decorator reads real annotations.)

For every image it materialises the target variants of the model config (training split:
every training short side x {no flip, flip} when the recipe flips; other splits: the test scale
only), using the same geometry (`models.preprocess`) and the same assignment function
(`models.targets.compute_targets`) that the tests check against the official algorithm. Images
go through in batches of `BATCH_SIZE`, one target graph call per batch; an image's output does
not depend on its batch (tested).
Degenerate instances are counted in `solo_targets_report.json` and the artifact's custom
properties, never dropped silently (they stay in the example, with no positive cell).
"""

import collections
import json
import os

import apache_beam as beam
import tensorflow as tf
from tfx.dsl.component.experimental.annotations import (
    BeamComponentParameter,
    InputArtifact,
    OutputArtifact,
    Parameter,
)
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from components.solo_targets.transform import TargetMaker, TargetSpec
from models.config import (
    TARGET_FIELDS,
    apply_overrides,
    get_experiment,
    select_target_overrides,
)
from schemas import features


def target_spec_for(experiment: str, split: str, train_split: str = "train") -> TargetSpec:
    """The variants a split gets under a named experiment config."""
    return TargetSpec.from_config(get_experiment(experiment), split, train_split)


# Examples per target graph call. The graph's fixed cost (some hundreds of small ops, plus the
# Python around the call) is paid once per batch; at 16 it is small next to the per-image work
# (`benchmarks/targets.py --batch-size B` measures other sizes).
BATCH_SIZE = 16


class _AddTargets(beam.DoFn):
    """A batch of serialized examples -> each with its targets, and its degenerate counts."""

    def __init__(self, spec: TargetSpec):
        self._spec = spec

    def setup(self):
        self._maker = TargetMaker(self._spec)

    def process(self, batch: list[bytes]):
        for record, counts in self._maker.add_targets_to_records(batch):
            yield beam.pvalue.TaggedOutput("counts", counts)
            yield record


def _sum_counters(counters) -> dict:
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


@component(use_beam=True)
def SoloTargetGen(  # noqa: N802 - TFX component names are CamelCase.
    examples: InputArtifact[standard_artifacts.Examples],
    targets: OutputArtifact[standard_artifacts.Examples],
    experiment: Parameter[str],
    train_split: Parameter[str] = "train",
    target_format: Parameter[int] = features.SOLO_TARGET_FORMAT_VERSION,
    target_overrides: Parameter[str] = "{}",
    beam_pipeline: BeamComponentParameter[beam.Pipeline] = None,
) -> None:
    """Writes `targets` (Examples, same splits) with K SOLO target variants per image.

    `target_format` must be `features.SOLO_TARGET_FORMAT_VERSION`, the only format this code
    writes; the pipeline passes it explicitly so that a format change changes the cache key.
    `target_overrides` is JSON `{"model": {...}, "train": {...}}` applied to the experiment
    (`models.config.apply_overrides`); only `models.config.TARGET_FIELDS` may appear, the same
    ones the Trainer gets, so that both see one geometry. The report records each split's
    `TargetSpec`, which the Trainer checks against its own config.
    """
    if target_format != features.SOLO_TARGET_FORMAT_VERSION:
        raise ValueError(
            f"target_format {target_format} is not this code's target format "
            f"{features.SOLO_TARGET_FORMAT_VERSION} (schemas/features.py)"
        )
    overrides = json.loads(target_overrides)
    if select_target_overrides(overrides) != overrides:
        raise ValueError(f"target_overrides may only set {TARGET_FIELDS}, got {target_overrides}")
    config = apply_overrides(get_experiment(experiment), overrides)
    splits = artifact_utils.decode_split_names(examples.split_names)
    targets.split_names = artifact_utils.encode_split_names(splits)
    report_dir = os.path.join(targets.uri, "_report")
    with beam_pipeline as pipeline:
        for split in splits:
            spec = TargetSpec.from_config(config, split, train_split)
            spec_json = spec.to_json()  # Recorded in the report, checked by the Trainer.
            results = (
                pipeline
                | f"Read[{split}]"
                >> beam.io.ReadFromTFRecord(os.path.join(examples.path(split=split), "*"))
                | f"Batch[{split}]"
                >> beam.BatchElements(min_batch_size=BATCH_SIZE, max_batch_size=BATCH_SIZE)
                | f"AddTargets[{split}]"
                >> beam.ParDo(_AddTargets(spec)).with_outputs("counts", main="examples")
            )
            _ = results.examples | f"Write[{split}]" >> beam.io.WriteToTFRecord(
                os.path.join(targets.path(split=split), "data_tfrecord"), file_name_suffix=".gz"
            )
            _ = (
                results.counts
                | f"Count[{split}]" >> beam.CombineGlobally(_sum_counters)
                | f"WriteCounts[{split}]"
                >> beam.Map(
                    lambda c, s=split, spec=spec_json: _write_json(
                        {
                            "split": s,
                            "variants": spec["variants"],
                            "spec": spec,
                            "images": None,
                            **c,
                        },
                        os.path.join(report_dir, f"{s}.json"),
                    )
                )
            )
            _ = (
                results.examples
                | f"CountImages[{split}]" >> beam.combiners.Count.Globally()
                | f"WriteImageCount[{split}]"
                >> beam.Map(
                    lambda n, s=split: _write_json(n, os.path.join(report_dir, f"{s}.images"))
                )
            )

    report = {"experiment": experiment, "target_overrides": overrides, "splits": {}}
    for split in splits:
        with tf.io.gfile.GFile(os.path.join(report_dir, f"{split}.json")) as f:
            split_report = json.load(f)
        with tf.io.gfile.GFile(os.path.join(report_dir, f"{split}.images")) as f:
            split_report["images"] = json.load(f)
        report["splits"][split] = split_report
        for key, value in split_report.items():
            if isinstance(value, int):
                targets.set_int_custom_property(f"{split}_{key}", value)
    tf.io.gfile.rmtree(report_dir)
    _write_json(report, os.path.join(targets.uri, features.SOLO_TARGETS_REPORT_FILENAME))
    category_map = os.path.join(examples.uri, features.CATEGORY_MAP_FILENAME)
    if tf.io.gfile.exists(category_map):
        tf.io.gfile.copy(
            category_map, os.path.join(targets.uri, features.CATEGORY_MAP_FILENAME), True
        )
    targets.set_int_custom_property("target_format", target_format)
    for key in ("payload_format", "file_format"):
        if key in examples.mlmd_artifact.custom_properties:
            targets.set_string_custom_property(key, examples.get_string_custom_property(key))


def _write_json(value, path: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f, indent=1)
