"""CocoExampleGen's Beam executor: COCO instances JSON + images -> one tf.Example per image.

Pipeline shape, per input split (one annotation file):

    Create([json path]) -> ParseAndIndex (one worker reads the JSON, packing each annotation
                                          as it is parsed, checks every record, and pickles
                                          the image tasks into task files)
        -> Reshuffle (spreads the task file paths over workers)
        -> BuildExamples (reads a task file; reads, checks, encodes one image at a time)
        -> [hash partition by image id, when splitting one file]
        -> WriteToTFRecord (gzip TFRecords `Split-<name>/data_tfrecord-*-of-*.gz`)

Everything from BuildExamples to the file runs fused, one image at a time, so no example waits
between steps and no decoded pixels are held.

Only file paths cross the shuffle, because the DirectRunner holds a shuffled collection in
memory, several times over in multi-processing mode (the runner's grouping buffer and gRPC
data channel, and the sending and receiving workers' buffers). An image task carries its
annotations (2.4 KB pickled for a demo image); shuffled as elements, the tasks added 19 KB to
peak memory per image in multi-processing mode, two thirds of the whole ingestion's cost then
(`benchmarks/ingestion.py`, 256 -> 1024 demo images). Task files (`TASK_DIRNAME` under the
Examples artifact, removed by `Do`) hold at most `MAX_TASKS_PER_FILE` tasks each, at least
`MIN_TASK_FILES` per split so that workers still share a split, and are read sequentially, so
that a distributed runner reads each byte once.

`Do` writes the splits itself instead of through the stock `write_split.WriteSplit`, which
reshuffles the encoded examples before writing them. The in-memory DirectRunner materialises
a shuffle, so that second one would hold every encoded example of the run at once: on its own
it adds 4.4x the encoded example to peak memory per image, against 0.2x for all of
CocoExampleGen without it (`benchmarks/ingestion.py`). It buys nothing here: the Reshuffle of
task files already spreads the work over workers, and the order of the records does not matter
because the Trainer shuffles. The output is otherwise what the stock writer produces: the same
files, split names and payload/file format properties.

Every rejection and every written image (as its split name and annotation count) also flows
into one combiner that writes `ingestion_report.json` into the Examples artifact; `Do` then
copies its totals into the artifact's custom properties (so they are queryable in ML Metadata)
and fails the run when the rejected fraction exceeds `max_reject_fraction`.

Options come from `custom_config` (see `component.CocoExampleGen`): `image_dirs` (split name ->
image root relative to `input_base`; default: inferred per split), `max_pixels`, and
`max_reject_fraction`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import tensorflow as tf
from google.protobuf import json_format, struct_pb2
from tfx.components.example_gen import utils as example_gen_utils
from tfx.components.example_gen import write_split
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.components.util import examples_utils
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from components.coco_example_gen.coco_reader import (
    CategoryMap,
    ImageTask,
    Rejection,
    index_coco,
    read_coco_json,
    resolve_image_path,
)
from components.coco_example_gen.example_builder import (
    DEFAULT_MAX_PIXELS,
    BuiltExample,
    build_example,
)
from schemas import features

DEFAULT_MAX_REJECT_FRACTION = 0.05
# Image tasks travel in task files (see the module docstring). A split is cut into at least
# MIN_TASK_FILES files, so that as many workers can share it, of at most MAX_TASKS_PER_FILE
# tasks (about 0.6 MB of demo or COCO tasks), so that a file stays a small piece of work.
MIN_TASK_FILES = 64
MAX_TASKS_PER_FILE = 256
# Task files are written under the Examples artifact, in this folder, and removed by `Do`.
TASK_DIRNAME = ".image_tasks"
# The report lists at most this many individual rejections of each kind; counts stay complete.
MAX_LISTED_REJECTIONS = 10_000
_REJECTED = "rejected"


def parse_custom_config(exec_properties: dict[str, Any]) -> dict[str, Any]:
    """Reads the options dict packed (as a Struct) into ExampleGen's CustomConfig proto."""
    raw = exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY)
    if not raw:
        return {}
    custom_config = example_gen_pb2.CustomConfig()
    proto_utils.json_to_proto(raw, custom_config)
    if not custom_config.custom_config.type_url:
        return {}
    options = struct_pb2.Struct()
    custom_config.custom_config.Unpack(options)
    return json_format.MessageToDict(options)


def infer_image_root(input_base: str, annotation_path: str, file_names: list[str]) -> str:
    """Finds the folder that a split's `file_name`s are relative to.

    COCO's own layout keeps `annotations/instances_val2017.json` next to `val2017/`, with bare
    file names; other datasets (like the demo data) store paths relative to the dataset root.
    Candidates, in order: `<input_base>/<X>` for `instances_<X>.json`, then `<input_base>`. The
    first in which a sample of the file names exists wins; `image_dirs` overrides this.
    """
    stem = os.path.splitext(os.path.basename(annotation_path))[0]
    candidates = []
    if stem.startswith("instances_"):
        candidates.append(os.path.join(input_base, stem[len("instances_") :]))
    candidates.append(input_base)
    sample = file_names[:20]
    for root in candidates:
        paths = [resolve_image_path(root, name) for name in sample]
        found = sum(p is not None and tf.io.gfile.exists(p) for p in paths)
        if sample and found * 2 >= len(sample):
            return root
    # Nothing found (missing files are reported image by image): prefer an existing folder.
    return next((root for root in candidates if tf.io.gfile.isdir(root)), input_base)


def tasks_per_file(num_images: int) -> int:
    """How many image tasks go into one task file, for a split of `num_images` images."""
    return max(1, min(MAX_TASKS_PER_FILE, math.ceil(num_images / MIN_TASK_FILES)))


class TaskFileWriter:
    """Pickles image tasks one after another into task files of at most `per_file` tasks.

    Each task is written as it comes, so only one is in memory. Every file gets a new name, so
    a retried bundle never overwrites a file that another attempt's output names.
    """

    def __init__(self, task_dir: str, split: str, per_file: int):
        self._task_dir = task_dir
        self._split = split
        self._per_file = per_file
        self._file = None
        self._path = ""
        self._count = 0
        tf.io.gfile.makedirs(task_dir)

    def add(self, task: ImageTask) -> str | None:
        """Writes `task`; returns the path of its file if that file is now full (and closed)."""
        if self._file is None:
            self._path = os.path.join(self._task_dir, f"{self._split}-{uuid.uuid4().hex}.tasks")
            self._file = tf.io.gfile.GFile(self._path, "wb")
        pickle.dump(task, self._file, pickle.HIGHEST_PROTOCOL)
        self._count += 1
        return self.close() if self._count == self._per_file else None

    def close(self) -> str | None:
        """Closes the file being filled, if any, and returns its path."""
        if self._file is None:
            return None
        self._file.close()
        self._file, self._count = None, 0
        return self._path


def read_task_file(path: str) -> Iterator[ImageTask]:
    """The tasks of one task file, in order, unpickled one at a time."""
    with tf.io.gfile.GFile(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


class _ParseAndIndex(beam.DoFn):
    """Reads one annotation file; emits task file paths (main), Rejections and input counts."""

    def __init__(self, split: str, category_map_json: list[dict[str, Any]], task_dir: str):
        self._split = split
        self._category_map_json = category_map_json
        self._task_dir = task_dir

    def process(self, annotation_path: str):
        data = read_coco_json(annotation_path, packed=True)
        yield beam.pvalue.TaggedOutput(
            "inputs",
            {
                "split": self._split,
                "annotation_file": annotation_path,
                "images": len(data["images"]),
                "annotations": len(data["annotations"]),
            },
        )
        category_map = CategoryMap.from_json(self._category_map_json)
        writer = TaskFileWriter(self._task_dir, self._split, tasks_per_file(len(data["images"])))
        for item in index_coco(data, self._split, category_map):
            if isinstance(item, Rejection):
                yield beam.pvalue.TaggedOutput(_REJECTED, item)
            elif path := writer.add(item):
                yield path
        if path := writer.close():
            yield path


class _BuildExamples(beam.DoFn):
    """Reads one task file; emits a BuiltExample (main) or Rejections per task, one at a time."""

    def __init__(self, image_root: str, class_index_by_coco_id: dict[int, int], max_pixels: int):
        self._image_root = image_root
        self._class_index_by_coco_id = class_index_by_coco_id
        self._max_pixels = max_pixels

    def process(self, task_file: str):
        for task in read_task_file(task_file):
            built, rejections = build_example(
                task, self._image_root, self._class_index_by_coco_id, self._max_pixels
            )
            for rejection in rejections:
                yield beam.pvalue.TaggedOutput(_REJECTED, rejection)
            if built is not None:
                yield built


def _hash_bucket(built: BuiltExample, num_partitions: int, buckets: list[int]) -> int:
    """Deterministic split assignment by image id (sha256 of its decimal string)."""
    del num_partitions
    bucket = int(hashlib.sha256(str(built.image_id).encode()).hexdigest(), 16) % buckets[-1]
    for index, upper in enumerate(buckets):
        if bucket < upper:
            return index
    raise AssertionError("unreachable")


class _ReportCombineFn(beam.CombineFn):
    """Folds input counts, written images and rejections into the ingestion report dict."""

    def create_accumulator(self):
        return {
            "inputs": [],
            "written": Counter(),
            "written_annotations": Counter(),
            "rejected": Counter(),
            "by_reason": Counter(),
            "listed": {"image": [], "annotation": []},
        }

    def add_input(self, acc, event):
        kind, payload = event
        if kind == "input":
            acc["inputs"].append(payload)
        elif kind == "written":
            split, num_annotations = payload
            acc["written"][split] += 1
            acc["written_annotations"][split] += num_annotations
        else:
            rejection: Rejection = payload
            acc["rejected"][(rejection.kind, rejection.split)] += 1
            acc["by_reason"][(rejection.kind, rejection.reason.value)] += 1
            listed = acc["listed"][rejection.kind]
            if len(listed) < MAX_LISTED_REJECTIONS:
                listed.append(rejection.to_json())
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            merged["inputs"] += acc["inputs"]
            for key in ("written", "written_annotations", "rejected", "by_reason"):
                merged[key].update(acc[key])
            for kind in ("image", "annotation"):
                room = MAX_LISTED_REJECTIONS - len(merged["listed"][kind])
                merged["listed"][kind] += acc["listed"][kind][:room]
        return merged

    def extract_output(self, acc):
        return build_report(acc)


def build_report(acc: dict[str, Any]) -> dict[str, Any]:
    """The ingestion report: totals that add up, per-split counts, and listed rejections."""
    inputs = sorted(acc["inputs"], key=lambda r: r["split"])
    totals = {}
    for kind, in_key, written in (
        ("image", "images", acc["written"]),
        ("annotation", "annotations", acc["written_annotations"]),
    ):
        rejected = sum(n for (k, _), n in acc["rejected"].items() if k == kind)
        totals[in_key] = {
            "in": sum(r[in_key] for r in inputs),
            "written": sum(written.values()),
            "rejected": rejected,
        }
    by_reason: dict[str, dict[str, int]] = {"image": {}, "annotation": {}}
    for (kind, reason), n in sorted(acc["by_reason"].items()):
        by_reason[kind][reason] = n
    for listed in acc["listed"].values():
        listed.sort(key=lambda r: (r["split"], r.get("image_id") or 0, r.get("annotation_id") or 0))
    return {
        "inputs": inputs,
        **totals,
        "output_splits": {
            split: {
                "images": acc["written"][split],
                "annotations": acc["written_annotations"][split],
            }
            for split in sorted(acc["written"])
        },
        "rejected_by_reason": by_reason,
        "rejected_images": acc["listed"]["image"],
        "rejected_annotations": acc["listed"]["annotation"],
        "listing_capped_at": MAX_LISTED_REJECTIONS,
    }


def _split_configs(
    exec_properties: dict[str, Any],
) -> tuple[example_gen_pb2.Input, example_gen_pb2.Output]:
    """The ExampleGen input and output configs (splits) from the execution properties."""
    input_config = example_gen_pb2.Input()
    proto_utils.json_to_proto(
        exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config
    )
    output_config = example_gen_pb2.Output()
    proto_utils.json_to_proto(
        exec_properties[standard_component_specs.OUTPUT_CONFIG_KEY], output_config
    )
    return input_config, output_config


def _write_json(value: Any, path: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=False)


class CocoExecutor(BaseExampleGenExecutor):
    """FileBasedExampleGen executor for COCO instances JSON files (one per input split)."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        raise NotImplementedError("CocoExecutor overrides GenerateExamplesByBeam directly.")

    def GenerateExamplesByBeam(
        self, pipeline: beam.Pipeline, exec_properties: dict[str, Any]
    ) -> dict[str, beam.pvalue.PCollection]:
        input_config, output_config = _split_configs(exec_properties)
        split_names = example_gen_utils.generate_output_split_names(input_config, output_config)
        input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
        options = parse_custom_config(exec_properties)
        max_pixels = int(options.get("max_pixels", DEFAULT_MAX_PIXELS))
        image_dirs = options.get("image_dirs", {})

        annotation_paths = {
            split.name: os.path.join(input_base, split.pattern) for split in input_config.splits
        }
        category_map, image_roots = self._scan_inputs(input_base, annotation_paths, image_dirs)
        self._category_map = category_map
        self._image_roots = image_roots
        class_index = category_map.index_by_coco_id

        events = []
        built_by_input_split = {}
        for split_name, annotation_path in annotation_paths.items():
            parsed = (
                pipeline
                | f"AnnotationFile[{split_name}]" >> beam.Create([annotation_path])
                | f"ParseAndIndex[{split_name}]"
                >> beam.ParDo(
                    _ParseAndIndex(split_name, category_map.to_json(), self._task_dir)
                ).with_outputs("inputs", _REJECTED, main="task_files")
            )
            built = (
                parsed.task_files
                | f"SpreadTaskFiles[{split_name}]" >> beam.Reshuffle()
                | f"BuildExamples[{split_name}]"
                >> beam.ParDo(
                    _BuildExamples(image_roots[split_name], class_index, max_pixels)
                ).with_outputs(_REJECTED, main="examples")
            )
            built_by_input_split[split_name] = built.examples
            events += [
                parsed.inputs | f"InputEvents[{split_name}]" >> beam.Map(lambda r: ("input", r)),
                parsed[_REJECTED]
                | f"IndexRejections[{split_name}]" >> beam.Map(lambda r: ("rejected", r)),
                built[_REJECTED]
                | f"ImageRejections[{split_name}]" >> beam.Map(lambda r: ("rejected", r)),
            ]

        if output_config.split_config.splits:
            if len(input_config.splits) != 1:
                raise ValueError("Splitting by hash needs exactly one input annotation file.")
            buckets, total = [], 0
            for split in output_config.split_config.splits:
                total += split.hash_buckets
                buckets.append(total)
            (only,) = built_by_input_split.values()
            partitions = only | "SplitByImageId" >> beam.Partition(
                _hash_bucket, len(buckets), buckets
            )
            output_splits = dict(zip(split_names, partitions))
        else:
            output_splits = dict(zip(split_names, built_by_input_split.values()))

        result = {}
        for split_name, built in output_splits.items():
            events.append(
                built
                | f"WrittenEvents[{split_name}]"
                >> beam.Map(lambda b, s=split_name: ("written", (s, b.num_annotations)))
            )
            result[split_name] = built | f"Serialized[{split_name}]" >> beam.Map(
                lambda b: b.serialized
            )

        report_path = os.path.join(self._report_dir, features.INGESTION_REPORT_FILENAME)
        _ = (
            events
            | "AllEvents" >> beam.Flatten()
            | "IngestionReport" >> beam.CombineGlobally(_ReportCombineFn())
            | "WriteReport" >> beam.Map(_write_json, report_path)
        )
        return result

    def _scan_inputs(
        self, input_base: str, annotation_paths: dict[str, str], image_dirs: dict[str, str]
    ) -> tuple[CategoryMap, dict[str, str]]:
        """One light pass over the annotation files: the shared category map and image roots.

        It runs in the launcher process, so it drops annotations as it parses them.
        """
        categories, image_roots = [], {}
        for split_name, path in annotation_paths.items():
            data = read_coco_json(path, annotations=False)
            categories += data["categories"]
            if split_name in image_dirs:
                image_roots[split_name] = os.path.join(input_base, image_dirs[split_name])
            else:
                names = [r.get("file_name", "") for r in data["images"] if isinstance(r, dict)]
                image_roots[split_name] = infer_image_root(input_base, path, names)
        category_map = CategoryMap.from_coco_categories(categories)
        if not len(category_map):
            raise ValueError(f"No categories declared in {sorted(annotation_paths.values())}")
        return category_map, image_roots

    def Do(self, input_dict, output_dict, exec_properties) -> None:
        """Writes every split (without the stock writer's shuffle), then checks the report."""
        self._log_startup(input_dict, output_dict, exec_properties)
        input_config, output_config = _split_configs(exec_properties)
        outputs = output_dict[standard_component_specs.EXAMPLES_KEY]
        examples = artifact_utils.get_single_instance(outputs)
        examples.split_names = artifact_utils.encode_split_names(
            example_gen_utils.generate_output_split_names(input_config, output_config)
        )
        self._report_dir = examples.uri
        self._task_dir = os.path.join(examples.uri, TASK_DIRNAME)

        try:
            with self._make_beam_pipeline() as pipeline:
                splits = self.GenerateExamplesByBeam(pipeline, exec_properties)
                for split_name, serialized in splits.items():
                    prefix = os.path.join(
                        artifact_utils.get_split_uri(outputs, split_name),
                        write_split.DEFAULT_TF_RECORD_FILE_NAME,
                    )
                    _ = serialized | f"WriteSplit[{split_name}]" >> beam.io.WriteToTFRecord(
                        prefix, file_name_suffix=".gz"
                    )
        finally:
            if tf.io.gfile.exists(self._task_dir):
                tf.io.gfile.rmtree(self._task_dir)

        # As the stock `BaseExampleGenExecutor.Do` sets them, for the readers downstream.
        payload_format = exec_properties.get(standard_component_specs.OUTPUT_DATA_FORMAT_KEY)
        if payload_format:
            examples_utils.set_payload_format(examples, payload_format)
        file_format = exec_properties.get(standard_component_specs.OUTPUT_FILE_FORMAT_KEY)
        if file_format:
            examples_utils.set_file_format(examples, write_split.to_file_format_str(file_format))

        _write_json(
            {"categories": self._category_map.to_json(), "image_roots": self._image_roots},
            os.path.join(examples.uri, features.CATEGORY_MAP_FILENAME),
        )
        report_path = os.path.join(examples.uri, features.INGESTION_REPORT_FILENAME)
        with tf.io.gfile.GFile(report_path) as f:
            report = json.load(f)
        for group in ("images", "annotations"):
            for key, value in report[group].items():
                examples.set_int_custom_property(f"{group}_{key}", value)
        examples.set_string_custom_property("ingestion_report", report_path)
        examples.set_int_custom_property("num_classes", len(self._category_map))

        max_fraction = float(
            parse_custom_config(exec_properties).get(
                "max_reject_fraction", DEFAULT_MAX_REJECT_FRACTION
            )
        )
        for group in ("images", "annotations"):
            counts = report[group]
            if counts["in"] and counts["rejected"] / counts["in"] > max_fraction:
                reasons = report["rejected_by_reason"][group[:-1]]
                raise RuntimeError(
                    f"CocoExampleGen rejected {counts['rejected']} of {counts['in']} {group} "
                    f"({counts['rejected'] / counts['in']:.1%}), above max_reject_fraction="
                    f"{max_fraction:.1%}. Reasons: {reasons}. Full report: {report_path}"
                )
