"""CocoExampleGen: the stock FileBasedExampleGen driven by our COCO Beam executor.

Using FileBasedExampleGen (not a new component class) keeps the stock driver (span/version,
input fingerprints for caching) and keeps the component compilable by KubeflowV2DagRunner,
which special-cases FileBasedExampleGen.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import message, struct_pb2
from tfx.components.example_gen.component import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2
from tfx.utils import proto_utils

from components.coco_example_gen.example_builder import DEFAULT_MAX_PIXELS
from components.coco_example_gen.executor import DEFAULT_MAX_REJECT_FRACTION, CocoExecutor


def CocoExampleGen(  # noqa: N802 - reads like a component class at the call site.
    input_base: str,
    *,
    split_files: dict[str, str] | None = None,
    single_file: str | None = None,
    hash_buckets: dict[str, int] | None = None,
    image_dirs: dict[str, str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
) -> FileBasedExampleGen:
    """Builds the ingestion component.

    Args:
      input_base: the dataset root. Annotation paths and `image_dirs` are relative to it.
      split_files: split name -> annotation JSON, e.g. {"train": "annotations/instances_train2017.json",
        "eval": "annotations/instances_val2017.json"}. Exclusive with `single_file`.
      single_file: one annotation JSON split by hashing the image id into `hash_buckets`
        (default {"train": 9, "eval": 1}).
      image_dirs: split name -> image folder relative to `input_base`. Default: inferred per
        split (COCO's `val2017/` beside `annotations/instances_val2017.json`, else the root).
      max_pixels: images whose header declares more pixels are refused before decoding.
      max_reject_fraction: the run fails when a larger fraction of images or annotations is
        rejected. Rejections are always listed in `ingestion_report.json`.
    """
    if (split_files is None) == (single_file is None):
        raise ValueError("Give exactly one of split_files or single_file.")
    if split_files is not None:
        input_config = example_gen_pb2.Input(
            splits=[example_gen_pb2.Input.Split(name=n, pattern=p) for n, p in split_files.items()]
        )
        output_config = example_gen_pb2.Output()
    else:
        input_config = example_gen_pb2.Input(
            splits=[example_gen_pb2.Input.Split(name="all", pattern=single_file)]
        )
        buckets = hash_buckets or {"train": 9, "eval": 1}
        output_config = example_gen_pb2.Output(
            split_config=example_gen_pb2.SplitConfig(
                splits=[
                    example_gen_pb2.SplitConfig.Split(name=n, hash_buckets=b)
                    for n, b in buckets.items()
                ]
            )
        )
    options: dict[str, Any] = {
        "max_pixels": max_pixels,
        "max_reject_fraction": max_reject_fraction,
    }
    if image_dirs:
        options["image_dirs"] = dict(image_dirs)
    struct = struct_pb2.Struct()
    struct.update(options)
    custom_config = example_gen_pb2.CustomConfig()
    custom_config.custom_config.Pack(struct)
    return FileBasedExampleGen(
        input_base=input_base,
        input_config=input_config,
        output_config=output_config,
        custom_config=custom_config,
        custom_executor_spec=executor_spec.BeamExecutorSpec(CocoExecutor),
    ).with_id("CocoExampleGen")


def executor_exec_properties(component: FileBasedExampleGen) -> dict[str, Any]:
    """The exec properties as the orchestrator hands them to `CocoExecutor.Do` (protos as JSON).

    For running the executor directly, as the tests and benchmarks do.
    """
    return {
        key: proto_utils.proto_to_json(value) if isinstance(value, message.Message) else value
        for key, value in component.exec_properties.items()
        if value is not None
    }
