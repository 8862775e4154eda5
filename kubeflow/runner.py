"""Kubeflow Pipelines runner: compiles `create_pipeline` into a KFP v2 PipelineJob file.

Like the local runner, it only chooses paths, engines and resources; the DAG comes from
`pipeline.pipeline.create_pipeline`. Compiling never submits anything (see kubeflow/README.md
for uploading the file). What changes against a local run:

- `pipeline_root`, the COCO data and the Pusher's `serving_dir` live on object storage
  (gs://...), because every step runs in its own pod;
- Beam steps (CocoExampleGen, StatisticsGen, SoloTargetGen, ...) run on a distributed runner,
  Dataflow by default, whose workers use the same image (`--sdk_container_image`);
- the Trainer and the mask evaluator get a GPU through a KFP `ResourceSpec`;
- ImportSchemaGen reads the schema file packaged inside the image instead of the compiling
  machine's copy;
- local-only nodes (InfraValidator, which needs a Docker daemon) must not be in the DAG:
  KubeflowV2DagRunner cannot compile them.

Every step runs `python -m tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor`
in the image built from the repository's Dockerfile. The model is Keras 3 (`import keras`), so
the image must NOT set `TF_USE_LEGACY_KERAS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from pipeline import configs
from pipeline.pipeline import DataSpec, TrainingSpec

# Object-storage COCO 2017 layout: <coco_dir>/annotations/instances_{train,val}2017.json with the
# images in <coco_dir>/{train,val}2017/ (CocoExampleGen infers the image folders).
COCO_2017_SPLIT_FILES = {
    "train": "annotations/instances_train2017.json",
    "eval": "annotations/instances_val2017.json",
}
DEFAULT_EXPERIMENT = "solov2_r50_fpn_1x"
DEFAULT_GPU_TYPE = "NVIDIA_TESLA_T4"
# Nodes that get the accelerator (by component id); the others run on CPU pods.
GPU_NODE_IDS = ("Trainer", "MaskEvaluator")
# Machine shape requested with the GPU (Vertex AI picks an N1 machine that fits; a T4 needs N1).
GPU_NODE_CPU_LIMIT = 8.0
GPU_NODE_MEMORY_LIMIT_GB = 30.0
# Where the Dockerfile installs the project; the schema is read from there inside the pods.
IMAGE_SITE_PACKAGES = "/opt/venv/lib/python3.10/site-packages"
IMAGE_SCHEMA_PATH = f"{IMAGE_SITE_PACKAGES}/{configs.SCHEMA_PATH_IN_PACKAGE}"

BEAM_RUNNERS = ("DataflowRunner", "DirectRunner", "FlinkRunner", "SparkRunner", "PortableRunner")


def beam_pipeline_args(
    runner: str,
    *,
    image: str,
    project: str | None = None,
    region: str | None = None,
    temp_location: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """Beam options for every Beam-powered step (ExampleGen driver included).

    - DataflowRunner: needs project, region and temp_location; workers start from `image`
      (`--sdk_container_image`), so they import this package exactly as the KFP pods do.
    - DirectRunner: runs inside the step's pod, in memory (small data only).
    - FlinkRunner / SparkRunner / PortableRunner: only `--runner` is set; the cluster address and
      the SDK environment (`--flink_master`, `--spark_master_url`, `--job_endpoint`,
      `--environment_type=EXTERNAL|DOCKER`, `--environment_config=...`) come through `extra`.
      See kubeflow/README.md.

    `extra` is appended last, so it can also override, e.g. `--machine_type=n1-highmem-8`.
    """
    if runner not in BEAM_RUNNERS:
        raise ValueError(f"unknown Beam runner {runner!r}; one of {', '.join(BEAM_RUNNERS)}")
    if runner == "DataflowRunner":
        missing = [
            name
            for name, value in (
                ("project", project),
                ("region", region),
                ("temp_location", temp_location),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"DataflowRunner needs {', '.join(missing)}")
        args = [
            "--runner=DataflowRunner",
            f"--project={project}",
            f"--region={region}",
            f"--temp_location={temp_location}",
            f"--sdk_container_image={image}",
        ]
    elif runner == "DirectRunner":
        args = list(configs.DEFAULT_BEAM_ARGS)
    else:
        args = [f"--runner={runner}"]
    return args + list(extra)


def compile_pipeline(
    output_path: str,
    *,
    image: str,
    pipeline_root: str,
    coco_dir: str,
    split_files: Mapping[str, str] = COCO_2017_SPLIT_FILES,
    experiment: str = DEFAULT_EXPERIMENT,
    training: TrainingSpec | None = None,
    beam_runner: str = "DataflowRunner",
    project: str | None = None,
    region: str | None = None,
    temp_location: str | None = None,
    extra_beam_args: Sequence[str] = (),
    gpu_type: str = DEFAULT_GPU_TYPE,
    gpu_count: int = 1,
    serving_dir: str | None = None,
    enable_cache: bool = True,
) -> dict[str, Any]:
    """Writes the KFP v2 PipelineJob to `output_path` and returns it as a dict.

    A `.json` path gets the whole PipelineJob (Vertex AI's format: pipelineSpec + runtimeConfig);
    a `.yaml`/`.yml` path gets the pipelineSpec only, as `kfp` compiles it for open-source KFP.
    Both carry `pipeline_root` (the spec's defaultPipelineRoot).

    Args:
      image: the image built from the Dockerfile, pushed to a registry the cluster can pull.
      pipeline_root: object storage for artifacts (gs://bucket/path); pods must read it.
      coco_dir: object-storage COCO root; `split_files` are relative to it.
      experiment: a name from `models.config.EXPERIMENTS`.
      training: Trainer steps, run_fn custom_config (strategy, overrides, ...) and the blessing
        gate, as for the local runner.
      beam_runner, project, region, temp_location, extra_beam_args: see `beam_pipeline_args`;
        temp_location defaults to `<pipeline_root>/beam-tmp`.
      gpu_type: accelerator for the GPU_NODE_IDS. Vertex AI Pipelines names GPUs
        (NVIDIA_TESLA_T4, NVIDIA_L4, ...); open-source KFP uses the Kubernetes resource name
        (nvidia.com/gpu). `gpu_count=0` trains on CPU.
      serving_dir: the Pusher's TF Serving base path; default `<pipeline_root>/serving/<pipeline>`.
    """
    from tfx.orchestration.kubeflow.v2.kubeflow_v2_dag_runner import (
        KubeflowV2DagRunner,
        KubeflowV2DagRunnerConfig,
    )

    from pipeline.pipeline import create_pipeline

    root = pipeline_root.rstrip("/")
    beam_args = beam_pipeline_args(
        beam_runner,
        image=image,
        project=project,
        region=region,
        temp_location=temp_location or f"{root}/beam-tmp",
        extra=extra_beam_args,
    )
    pipeline = create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=pipeline_root,
        data=DataSpec(root=coco_dir, split_files=dict(split_files)),
        serving_dir=serving_dir or f"{root}/serving/{configs.PIPELINE_NAME}",
        experiment=experiment,
        training=training,
        beam_pipeline_args=beam_args,
        enable_cache=enable_cache,
    )
    _reject_local_only_nodes(pipeline)
    _read_schema_from_image(pipeline)
    if gpu_count > 0:
        _request_gpus(pipeline, gpu_type, gpu_count)

    job = KubeflowV2DagRunner(
        KubeflowV2DagRunnerConfig(display_name=configs.PIPELINE_NAME, default_image=image)
    ).run(pipeline, write_out=False)
    # Also inside the spec, so that a YAML (spec only) uploaded to KFP keeps its pipeline_root.
    job["pipelineSpec"]["defaultPipelineRoot"] = pipeline_root
    _write(job, output_path)
    return job


def _write(job: Mapping[str, Any], output_path: str) -> None:
    """`.yaml`/`.yml`: the pipelineSpec only (what `kfp` compiles to); otherwise the JSON job."""
    from tfx.dsl.io import fileio

    parent = os.path.dirname(output_path)
    if parent:
        fileio.makedirs(parent)
    with fileio.open(output_path, "w") as f:
        if output_path.endswith((".yaml", ".yml")):
            yaml.safe_dump(job["pipelineSpec"], f, sort_keys=True)
        else:
            json.dump(job, f, indent=1, sort_keys=True)


def _reject_local_only_nodes(pipeline) -> None:
    """KubeflowV2DagRunner raises NotImplementedError on InfraValidator; say what to do instead.

    It cannot simply be dropped here: the Pusher's `infra_blessing` input would dangle.
    """
    from tfx import v1 as tfx

    local_only = [c.id for c in pipeline.components if isinstance(c, tfx.components.InfraValidator)]
    if local_only:
        raise ValueError(
            f"{local_only} need a local Docker daemon and cannot run on Kubeflow (KFP v2 "
            "rejects InfraValidator). Build the pipeline without them for Kubeflow."
        )


def _read_schema_from_image(pipeline) -> None:
    """Points ImportSchemaGen at the schema installed in the image.

    `create_pipeline` resolves the packaged schema to a path on the compiling machine, which does
    not exist in the pods. A schema given as an object-storage path is left alone.
    """
    from tfx import v1 as tfx

    from pipeline.pipeline import schema_path

    local_schema = schema_path()
    for component in pipeline.components:
        if (
            isinstance(component, tfx.components.ImportSchemaGen)
            and component.exec_properties["schema_file"] == local_schema
        ):
            component.exec_properties["schema_file"] = IMAGE_SCHEMA_PATH


def _request_gpus(pipeline, gpu_type: str, gpu_count: int) -> None:
    from kfp.pipeline_spec import pipeline_spec_pb2

    resource_spec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec
    for component in pipeline.components:
        if component.id in GPU_NODE_IDS:
            component.with_platform_config(
                resource_spec(
                    cpu_limit=GPU_NODE_CPU_LIMIT,
                    memory_limit=GPU_NODE_MEMORY_LIMIT_GB,
                    accelerator=resource_spec.AcceleratorConfig(type=gpu_type, count=gpu_count),
                )
            )


def describe(job: Mapping[str, Any]) -> str:
    """A few lines about a compiled PipelineJob dict: each task's image and accelerator."""
    spec = job["pipelineSpec"]
    executors = spec["deploymentSpec"]["executors"]
    lines = [f"{spec['pipelineInfo']['name']}: {len(spec['root']['dag']['tasks'])} tasks"]
    for name, task in sorted(spec["root"]["dag"]["tasks"].items()):
        executor = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]
        container = executor.get("container")
        where = container["image"] if container else next(iter(executor))  # resolver/importer
        accelerator = (container or {}).get("resources", {}).get("accelerator")
        if accelerator:
            where += f"  ({accelerator.get('count', 0)} x {accelerator['type']})"
        lines.append(f"  {name:<54} {where}")
    lines.append(f"pipeline_root: {job['runtimeConfig']['gcsOutputDirectory']}")
    return "\n".join(lines)
