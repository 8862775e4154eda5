"""The one place the pipeline DAG is drawn. Runners only choose paths, engines and options."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from tfx import v1 as tfx
from tfx.orchestration import pipeline as tfx_pipeline

from components.coco_example_gen.component import CocoExampleGen
from components.solo_targets.component import SoloTargetGen
from pipeline import configs


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the COCO data is: a root plus annotation files relative to it.

    Either `split_files` (split name -> annotation JSON) or `single_file` (split by image-id
    hash) is set. `image_dirs` optionally maps split name -> image folder under `root`.
    """

    root: str
    split_files: dict[str, str] | None = None
    single_file: str | None = None
    image_dirs: dict[str, str] | None = None


def schema_path() -> str:
    """The packaged schema file (schemas/schema.pbtxt)."""
    import schemas

    return os.path.join(os.path.dirname(schemas.__file__), "schema.pbtxt")


def create_pipeline(
    *,
    pipeline_name: str,
    pipeline_root: str,
    data: DataSpec,
    experiment: str = configs.DEFAULT_EXPERIMENT,
    metadata_connection_config=None,
    beam_pipeline_args: Sequence[str] = configs.DEFAULT_BEAM_ARGS,
    max_reject_fraction: float = 0.05,
    enable_cache: bool = True,
) -> tfx_pipeline.Pipeline:
    """Builds the SOLOv2 pipeline.

    DAG (stages added as they land): CocoExampleGen -> StatisticsGen -> ImportSchemaGen ->
    ExampleValidator; CocoExampleGen -> SoloTargetGen.

    Args:
      experiment: a name from `models.config.EXPERIMENTS`; it fixes the target geometry.
    """
    example_gen = CocoExampleGen(
        data.root,
        split_files=data.split_files,
        single_file=data.single_file,
        image_dirs=data.image_dirs,
        max_reject_fraction=max_reject_fraction,
    )
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=schema_path())
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    solo_targets = SoloTargetGen(examples=example_gen.outputs["examples"], experiment=experiment)
    components = [example_gen, statistics_gen, schema_gen, example_validator, solo_targets]
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args),
    )
