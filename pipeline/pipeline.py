"""The one place the pipeline DAG is drawn. Runners only choose paths, engines and options."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tfx import v1 as tfx
from tfx.orchestration import pipeline as tfx_pipeline

from components.coco_example_gen.component import CocoExampleGen
from components.mask_evaluator.component import MaskEvaluator
from components.run_report.component import RunReport
from components.solo_targets.component import SoloTargetGen
from models.config import select_target_overrides
from pipeline import configs
from schemas import features

RUN_FN = "models.train.run_fn"


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


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """What the Trainer and the blessing gate get.

    `custom_config` goes to `models.train.run_fn` unchanged (keys: experiment, overrides,
    strategy, mixed_precision, checkpoint_every, ...); `experiment` is added from the pipeline
    argument. `train_steps` None means the recipe's epochs.
    """

    train_steps: int | None = None
    custom_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    min_mask_ap: float = 0.0
    max_regression: float = 0.01
    eval_batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class InfraValidationSpec:
    """The stock InfraValidator: TF Serving in local Docker loads the model and answers requests.

    LocalDagRunner only, on a machine with a Docker daemon: KubeflowV2DagRunner rejects the
    component (kubeflow/runner.py says so). Requests are `serving_default` PredictRequests built
    from the eval split (serialized tf.Examples); the Pusher then needs both blessings.
    """

    serving_image_tag: str = "2.16.1"  # tensorflow/serving:<tag>, the TF 2.16 serving build
    num_examples: int = 4
    max_loading_time_seconds: int = 300
    num_tries: int = 3


def infra_validator(model, examples, spec: InfraValidationSpec):
    """InfraValidator for `spec`, serving `model` under configs.SERVING_MODEL_NAME."""
    return tfx.components.InfraValidator(
        model=model,
        examples=examples,
        serving_spec=tfx.proto.ServingSpec(
            tensorflow_serving=tfx.proto.TensorFlowServing(tags=[spec.serving_image_tag]),
            local_docker=tfx.proto.LocalDockerConfig(),
            model_name=configs.SERVING_MODEL_NAME,
        ),
        request_spec=tfx.proto.RequestSpec(
            tensorflow_serving=tfx.proto.TensorFlowServingRequestSpec(
                signature_names=["serving_default"]
            ),
            split_name="eval",
            num_examples=spec.num_examples,
        ),
        validation_spec=tfx.proto.ValidationSpec(
            max_loading_time_seconds=spec.max_loading_time_seconds, num_tries=spec.num_tries
        ),
    )


def schema_path() -> str:
    """The packaged schema file (schemas/schema.pbtxt)."""
    import schemas

    return os.path.join(os.path.dirname(schemas.__file__), "schema.pbtxt")


def create_pipeline(
    *,
    pipeline_name: str,
    pipeline_root: str,
    data: DataSpec,
    serving_dir: str,
    experiment: str = configs.DEFAULT_EXPERIMENT,
    training: TrainingSpec | None = None,
    metadata_connection_config=None,
    beam_pipeline_args: Sequence[str] = configs.DEFAULT_BEAM_ARGS,
    max_reject_fraction: float = 0.05,
    enable_cache: bool = True,
    infra_validation: InfraValidationSpec | None = None,
) -> tfx_pipeline.Pipeline:
    """Builds the SOLOv2 pipeline.

    DAG: CocoExampleGen -> StatisticsGen -> ExampleValidator (with ImportSchemaGen's schema);
    CocoExampleGen -> SoloTargetGen -> Trainer -> MaskEvaluator (eval split of CocoExampleGen,
    baseline = latest blessed model) -> Pusher (to `serving_dir`/<version>, only when blessed);
    MaskEvaluator + Trainer logs + eval examples -> RunReport (HTML + PNGs, blessed or not).

    Args:
      experiment: a name from `models.config.EXPERIMENTS`; it fixes target geometry and model.
      serving_dir: the TF Serving model base path (`.../<model_name>`), on storage the Pusher
        can write.
      infra_validation: adds the stock InfraValidator (TF Serving in local Docker) between the
        Trainer and the Pusher; local runs only. None (default) leaves it out.
    """
    training = training or TrainingSpec()
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
    solo_targets = SoloTargetGen(
        examples=example_gen.outputs["examples"],
        experiment=experiment,
        target_format=features.SOLO_TARGET_FORMAT_VERSION,  # explicit: part of the cache key
        # Only the overrides that change targets: a training-only change keeps them cached.
        target_overrides=json.dumps(
            select_target_overrides(training.custom_config.get("overrides")), sort_keys=True
        ),
    )

    custom_config = {
        "experiment": experiment,
        # Stable across executions so that a killed and re-run Trainer resumes; run_fn keys a
        # subfolder by its inputs and config, so a different run never resumes the wrong model.
        "checkpoint_dir": os.path.join(pipeline_root, "Trainer", "_checkpoints"),
        **dict(training.custom_config),
    }
    trainer = tfx.components.Trainer(
        run_fn=RUN_FN,
        examples=solo_targets.outputs["targets"],
        train_args=tfx.proto.TrainArgs(splits=["train"], num_steps=training.train_steps),
        eval_args=tfx.proto.EvalArgs(splits=["eval"], num_steps=0),
        custom_config=custom_config,
    )
    baseline_resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = MaskEvaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=baseline_resolver.outputs["model"],
        min_mask_ap=training.min_mask_ap,
        max_regression=training.max_regression,
        batch_size=training.eval_batch_size,
    )
    run_report = RunReport(
        evaluation=evaluator.outputs["evaluation"],
        model_run=trainer.outputs["model_run"],
        examples=example_gen.outputs["examples"],
    )
    infra = (
        infra_validator(trainer.outputs["model"], example_gen.outputs["examples"], infra_validation)
        if infra_validation is not None
        else None
    )
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        infra_blessing=infra.outputs["blessing"] if infra is not None else None,
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_dir)
        ),
    )
    components = [
        example_gen,
        statistics_gen,
        schema_gen,
        example_validator,
        solo_targets,
        trainer,
        baseline_resolver,
        evaluator,
        run_report,
        *([infra] if infra is not None else []),
        pusher,
    ]
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args),
    )
