"""SOLOv2 training: the TFX Trainer `run_fn`, a reusable `train()`, and its pieces.

One step, whatever the strategy (default, Mirrored, MultiWorkerMirrored, TPU):

1. each replica runs the model on its share of the global batch and computes `solov2_loss`
   normalised by the GLOBAL positive counts (`models.losses.global_positive_counts`), so the
   replica losses sum to the single-device loss of the global batch;
2. its gradients are summed over replicas (one explicit all-reduce);
3. the summed gradients are clipped to a global L2 norm of `TrainConfig.grad_clip_norm` (35),
   i.e. the norm of the whole batch's gradient, as on one device;
4. `TorchSGD` applies them with PyTorch/mmdet semantics: coupled L2 weight decay on every
   trainable parameter (norm and bias included, as official mmdet does), then momentum 0.9.

Mixed precision: `keras.config.set_dtype_policy` while the model is built (variables stay
float32, losses are computed in float32); "mixed_float16" wraps the optimizer in a
`keras.optimizers.LossScaleOptimizer` (dynamic loss scale; a step with non-finite gradients is
skipped and halves the scale). The exported SavedModel is always float32.

Checkpoints (`tf.train.CheckpointManager`: model, optimizer, step) are written every
`checkpoint_every` steps and at the end; on start the latest one is restored and training
continues from its step (the learning-rate schedule follows `optimizer.iterations`). TensorBoard
scalars go to `model_dir/train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from components.solo_targets.transform import TargetSpec, decode_training_example
from models import export, preprocess
from models.config import (
    TARGET_FIELDS,
    ExperimentConfig,
    TrainConfig,
    apply_overrides,
    get_experiment,
)
from models.losses import DEFAULT_MAX_POSITIVES, global_positive_counts, solov2_loss
from models.schedule import schedule_from_config
from models.solov2 import build_model
from schemas import features

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = (None, "mixed_float16", "mixed_bfloat16")
TRAINING_SUMMARY_FILENAME = "training_summary.json"  # in model_dir (the ModelRun artifact)
DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_LOG_EVERY = 50
_LOGGER = logging.getLogger(__name__)
DEFAULT_SHUFFLE_BUFFER = 512
# Instances per image when the batch needs a static shape (TPU).
DEFAULT_TPU_MAX_INSTANCES = 100

# Per-replica metrics summed over replicas (each replica holds its share of the global value).
_SUMMED_METRICS = ("category_loss", "mask_loss", "total_loss", "num_positives")


# --------------------------------------------------------------------------------------------
# Optimizer


@keras.saving.register_keras_serializable(package="solov2")
class TorchSGD(keras.optimizers.SGD):
    """SGD with PyTorch semantics (official SOLOv2 trains with torch.optim.SGD in mmdet).

    For each trainable variable `w` with gradient `g` and learning rate `lr`:

        g <- g + l2 * w            (coupled L2 "weight_decay", every parameter)
        b <- momentum * b + g      (b = 0 initially)
        w <- w - lr * b

    Keras' own SGD keeps `v = momentum * v - lr * g` instead, which differs when the lr changes.

    Gradients given to `apply()` must already be summed over replicas: the train step all-reduces
    them itself to clip the global gradient, so the Keras all-reduce is skipped here.
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, l2=1e-4, name="TorchSGD", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, name=name, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = keras.ops.cast(learning_rate, variable.dtype)
        gradient = keras.ops.cast(gradient, variable.dtype)
        if self.l2:
            gradient = gradient + keras.ops.cast(self.l2, variable.dtype) * variable
        if self.momentum:
            buffer = self.momentums[self._get_variable_index(variable)]
            self.assign(buffer, keras.ops.cast(self.momentum, variable.dtype) * buffer + gradient)
            gradient = buffer
        self.assign_sub(variable, learning_rate * gradient)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # TF backend hook (keras/src/backend/tensorflow/optimizer.py): already summed.
        return list(grads_and_vars)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


@keras.saving.register_keras_serializable(package="solov2")
class SummedGradientAdamW(keras.optimizers.AdamW):
    """Keras AdamW (decoupled weight decay) for gradients already summed over replicas.

    Not the official optimizer: `TrainConfig(optimizer="adamw")` selects it (the demo recipe
    does; see `models.config.demo_cpu`). Like `TorchSGD`, it skips Keras' own all-reduce because
    the train step all-reduces and clips the gradients itself.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def make_optimizer(
    train_config: TrainConfig, total_steps: int, mixed_precision: str | None = None
) -> keras.optimizers.Optimizer:
    """The recipe's optimizer on its schedule; wrapped in a LossScaleOptimizer for float16.

    "sgd" (official): `TorchSGD`. "adamw": `SummedGradientAdamW` with Keras' default betas and
    epsilon, `weight_decay` decoupled (scaled by the learning rate at every step).
    """
    schedule = schedule_from_config(train_config, total_steps)
    if train_config.optimizer == "adamw":
        optimizer = SummedGradientAdamW(
            learning_rate=schedule, weight_decay=train_config.weight_decay
        )
    else:
        optimizer = TorchSGD(
            learning_rate=schedule,
            momentum=train_config.momentum,
            l2=train_config.weight_decay,
        )
    if mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# --------------------------------------------------------------------------------------------
# Strategy and precision


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The strategy called `name` (see STRATEGIES).

    "auto" picks TPUStrategy if a TPU resolver connects, MultiWorkerMirroredStrategy if TF_CONFIG
    names more than one worker, MirroredStrategy if there is more than one GPU, else the default
    (one-device) strategy. "mirrored" uses every local GPU (or the CPU).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} not in {STRATEGIES}")
    if name == "tpu" or (name == "auto" and _tpu_hint()):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
                tpu=os.environ.get("TPU_NAME", "local" if _local_tpus() else None)
            )
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError):
            if name == "tpu":
                raise
            _LOGGER.info("No TPU found; falling back.")
    if name == "multi_worker" or (name == "auto" and _num_workers() > 1):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored" or (name == "auto" and len(tf.config.list_physical_devices("GPU")) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _local_tpus() -> bool:
    return bool(tf.config.list_physical_devices("TPU"))


def _tpu_hint() -> bool:
    """Cheap check before trying a TPU resolver (which may query a metadata server)."""
    return _local_tpus() or any(k in os.environ for k in ("TPU_NAME", "COLAB_TPU_ADDR"))


def _num_workers() -> int:
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return len(cluster.get("worker", ())) + len(cluster.get("chief", ()))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes summaries, checkpoints and the export."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


def cpu_has_native_bfloat16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises bfloat16 dot products (AVX512-BF16 or AMX-BF16; Linux)."""
    try:
        with open(cpuinfo_path) as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(
    name: str | None, strategy: tf.distribute.Strategy | None = None
) -> str | None:
    """A precision name from `models.config.PRECISIONS` -> a `MIXED_PRECISION` policy.

    "auto" picks "mixed_bfloat16" on TPU, and on a CPU-only host whose CPU computes bfloat16
    natively (oneDNN then runs convolutions and matmuls in bfloat16: a demo_cpu step took 0.76-0.85x
    the float32 time on an AVX512-BF16 EPYC); float32 anywhere else, GPUs included (use
    "mixed_float16" there explicitly). None and "float32" mean float32.
    """
    if name == "auto":
        strategy = strategy or tf.distribute.get_strategy()
        if isinstance(strategy, tf.distribute.TPUStrategy):
            return "mixed_bfloat16"
        cpu_only = not tf.config.list_physical_devices("GPU")
        return "mixed_bfloat16" if cpu_only and cpu_has_native_bfloat16() else None
    if name == "float32":
        return None
    if name not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {name!r} not in {MIXED_PRECISION + ('float32', 'auto')}")
    return name


@contextlib.contextmanager
def dtype_policy(mixed_precision: str | None):
    """Sets the global Keras dtype policy for layers built inside; restores it on exit."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {mixed_precision!r} not in {MIXED_PRECISION}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(mixed_precision or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------------------------
# Input pipeline


def make_dataset(
    file_patterns: str | Sequence[str],
    config: ExperimentConfig,
    batch_size: int,
    *,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    max_instances: int | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Gzip TFRecords of SoloTargetGen examples -> endless batches of model inputs and targets.

    TFRecordDataset -> (shard) -> shuffle -> repeat -> parallel `decode_training_example` (one
    random target variant per image per step; element order kept only when `seed` is set) ->
    padded_batch (instances padded to the largest N of the batch, or to `max_instances` for
    static shapes) with drop_remainder -> prefetch. Under `config.train.orientation_pad` the
    batches are grouped by pad shape first (`group_by_window`): each batch holds images of one
    orientation, padded to its rectangle (the spatial dims of the element spec are then None,
    and the train step, traced once for that spec, takes both shapes).

    Returns batches of `images [b, Ph, Pw, 3]` float32, `cell_class` / `cell_instance`
    `[b, cells]` int32, `instance_masks [b, N, Ph/4, Pw/4]` uint8 (b = `batch_size`, per
    replica; Ph = Pw = P without `orientation_pad`).
    """
    patterns = [file_patterns] if isinstance(file_patterns, str) else list(file_patterns)
    files = sorted(f for p in patterns for f in tf.io.gfile.glob(p))
    if not files:
        raise ValueError(f"no training files match {patterns}")
    shards = input_context.num_input_pipelines if input_context else 1
    shard_id = input_context.input_pipeline_id if input_context else 0
    shard_records = shards > 1 and len(files) < shards  # Too few files to shard by file.
    if shards > 1 and not shard_records:
        files = files[shard_id::shards]
    dataset = tf.data.TFRecordDataset(
        files, compression_type="GZIP", num_parallel_reads=min(len(files), 8)
    )
    if shard_records:
        dataset = dataset.shard(shards, shard_id)
    dataset = dataset.shuffle(shuffle_buffer, seed=seed).repeat()

    max_size = config.train.train_max_size
    if max_size != config.model.image_max_size:
        raise ValueError("train_max_size and image_max_size must agree (one static pad size)")
    decode = functools.partial(
        decode_training_example,
        max_size=max_size,
        num_cells=config.model.num_cells,
        random_variant=True,
        seed=seed,
        orientation_pad=config.train.orientation_pad,
    )

    def parse(serialized):
        example = decode(serialized)
        example.pop("image_id")
        if max_instances is not None:
            example = _keep_instances(example, max_instances)
        return example

    dataset = dataset.map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None
    )
    if config.train.orientation_pad:
        # One pad shape per batch: images wait in a window of their orientation until
        # `batch_size` of them are there (mmdet's GroupSampler); a batch pads to their pad.
        dataset = dataset.group_by_window(
            key_func=lambda example: tf.cast(tf.shape(example["images"])[0], tf.int64),
            reduce_func=lambda _, window: _padded_batch(
                window, batch_size, config, max_instances, [None, None]
            ),
            window_size=batch_size,
        )
    else:
        # Static shapes but the instance count (unless `max_instances`): the train step is
        # traced once for this element spec.
        pad = preprocess.padded_size(max_size)
        dataset = _padded_batch(dataset, batch_size, config, max_instances, [pad, pad])
    return dataset.prefetch(tf.data.AUTOTUNE)


def _padded_batch(dataset, batch_size, config, max_instances, pad_shape) -> tf.data.Dataset:
    """`padded_batch` of decoded examples, `pad_shape` (height, width; None: the batch's)."""
    pad_height, pad_width = pad_shape
    quarter = [None if size is None else size // 4 for size in pad_shape]
    return dataset.padded_batch(
        batch_size,
        padded_shapes={
            "images": [pad_height, pad_width, 3],
            "cell_class": [config.model.num_cells],
            "cell_instance": [config.model.num_cells],
            "instance_masks": [max_instances, *quarter],
        },
        drop_remainder=True,
    )


def _keep_instances(example: dict, max_instances: int) -> dict:
    """Drops instances >= max_instances; their cells become background (static-shape batches)."""
    dropped = example["cell_instance"] >= max_instances
    example["cell_class"] = tf.where(dropped, -1, example["cell_class"])
    example["cell_instance"] = tf.where(dropped, -1, example["cell_instance"])
    example["instance_masks"] = example["instance_masks"][:max_instances]
    return example


# --------------------------------------------------------------------------------------------
# Model, optimizer and the distributed step


class SOLOv2Trainer:
    """Model, optimizer and step counter built in `strategy.scope()`, plus the train step.

    Args:
      config: the experiment (model + recipe).
      total_steps: run length (the schedule's step boundaries / cosine period).
      strategy: a tf.distribute strategy (default: the current one).
      mixed_precision: None, "mixed_float16" or "mixed_bfloat16".
      max_positives: per-image positive buffer of the mask loss.
      static_shapes: keep that buffer at `max_positives` slots (`solov2_loss(trim_buffer=False)`)
        instead of cutting it to the batch's largest positive count. None: only on TPU, which
        needs static shapes.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        total_steps: int,
        *,
        strategy: tf.distribute.Strategy | None = None,
        mixed_precision: str | None = None,
        max_positives: int = DEFAULT_MAX_POSITIVES,
        static_shapes: bool | None = None,
    ):
        self.config = config
        self.total_steps = int(total_steps)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.mixed_precision = mixed_precision
        self.max_positives = max_positives
        if static_shapes is None:
            static_shapes = isinstance(self.strategy, tf.distribute.TPUStrategy)
        self.static_shapes = static_shapes
        with dtype_policy(mixed_precision), self.strategy.scope():
            self.model = build_model(config.model)
            self.optimizer = make_optimizer(config.train, total_steps, mixed_precision)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, step=self.step
        )
        self._loss_scaling = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        # Batches pad instances to the largest count in the batch, so the instance dimension
        # changes from batch to batch; a plain tf.function would trace the step once per count
        # (each trace ~10 s for demo_cpu). `distribute` replaces this with one traced for the
        # dataset's element spec; batches from elsewhere relax to the general shape on retrace.
        self._step_fn = tf.function(self._distributed_step, reduce_retracing=True)

    @property
    def global_batch_size(self) -> int:
        return self.config.train.batch_size

    def distribute(self, dataset_fn) -> tf.distribute.DistributedDataset:
        """`dataset_fn(input_context, per_replica_batch)` -> a distributed dataset.

        The train step is then traced once, for the dataset's element spec (the instance
        dimension unknown), however many instances each batch pads to.
        """
        dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: dataset_fn(ctx, ctx.get_per_replica_batch_size(self.global_batch_size))
        )
        self._step_fn = tf.function(self._distributed_step, input_signature=[dataset.element_spec])
        return dataset

    @property
    def traces(self) -> int:
        """How many times the current train step function has been traced."""
        return self._step_fn.experimental_get_tracing_count()

    def train_step(self, batch) -> dict[str, tf.Tensor]:
        """One optimizer step on a distributed batch; returns global metrics (float32 scalars)."""
        return self._step_fn(batch)

    def _distributed_step(self, batch):
        per_replica = self.strategy.run(self._replica_step, args=(batch,))
        metrics = {
            key: self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica[key], axis=None)
            for key in _SUMMED_METRICS
        }
        for key in ("grad_norm", "learning_rate", "loss_scale"):  # Equal on every replica.
            metrics[key] = self.strategy.reduce(
                tf.distribute.ReduceOp.MEAN, per_replica[key], axis=None
            )
        self.step.assign_add(1)
        return metrics

    def _replica_step(self, batch):
        model_config = self.config.model
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self.model(batch["images"], training=True)
            num_pos, num_mask = global_positive_counts(batch["cell_class"], self.max_positives)
            parts = solov2_loss(
                outputs,
                batch,
                num_classes=model_config.num_classes,
                focal_alpha=model_config.focal_alpha,
                focal_gamma=model_config.focal_gamma,
                dice_weight=model_config.mask_loss_weight,
                max_positives=self.max_positives,
                global_num_positives=num_pos,
                global_num_mask_positives=num_mask,
                trim_buffer=not self.static_shapes,
            )
            category_loss = model_config.category_loss_weight * parts["category_loss"]
            loss = category_loss + parts["mask_loss"]
            scaled_loss = self.optimizer.scale_loss(loss) if self._loss_scaling else loss
        grads = tape.gradient(scaled_loss, variables)
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        grads = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [g for g, _ in pairs]
        )
        # Read the scale now: the variable itself would be read after `apply` updates it.
        loss_scale = (
            tf.convert_to_tensor(self.optimizer.dynamic_scale)
            if self._loss_scaling
            else tf.constant(1.0)
        )
        if self._loss_scaling:
            grads = [g / loss_scale for g in grads]
        grad_norm = tf.linalg.global_norm(grads)
        clip = self.config.train.grad_clip_norm
        if clip is not None:
            grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=grad_norm)
        if self._loss_scaling:  # LossScaleOptimizer unscales, checks finiteness, then applies.
            grads = [g * loss_scale for g in grads]
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        self.optimizer.apply(grads, [v for _, v in pairs])
        return {
            "category_loss": category_loss,
            "mask_loss": parts["mask_loss"],
            "total_loss": loss,
            "num_positives": parts["num_positives"],
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "loss_scale": tf.cast(loss_scale, tf.float32),
        }

    def float32_model(self):
        """The trained model in float32 (a float32 copy when trained in mixed precision)."""
        if self.mixed_precision is None:
            return self.model
        with dtype_policy(None):
            model = build_model(self.config.model)
        model.set_weights(self.model.get_weights())
        return model


# --------------------------------------------------------------------------------------------
# The training loop


def train(
    config: ExperimentConfig,
    train_file_pattern: str | Sequence[str],
    model_dir: str,
    serving_dir: str | None,
    total_steps: int,
    *,
    strategy: str | tf.distribute.Strategy = "auto",
    mixed_precision: str | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    log_every: int = DEFAULT_LOG_EVERY,
    checkpoint_dir: str | None = None,
    category_map=None,
    max_positives: int = DEFAULT_MAX_POSITIVES,
    max_instances: int | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int | None = None,
) -> dict:
    """Trains `config` for `total_steps` global steps (resuming from the latest checkpoint).

    Args:
      config: the experiment; `config.train.batch_size` is the GLOBAL batch.
      train_file_pattern: glob(s) of gzip TFRecords of SoloTargetGen examples.
      model_dir: TensorBoard logs (`model_dir/train`) and, by default, checkpoints.
      serving_dir: where the SavedModel is exported at the end (None: no export).
      total_steps: global steps; training stops at this step (and only exports when resumed
        at or past it).
      strategy: a name from STRATEGIES (see `make_strategy`) or a Strategy.
      mixed_precision: None (the recipe's `config.train.mixed_precision`), "float32",
        "mixed_float16", "mixed_bfloat16" or "auto" (see `resolve_mixed_precision`).
      checkpoint_every: save a checkpoint every this many steps (and at the end).
      log_every: write summaries / log every this many steps.
      checkpoint_dir: defaults to `model_dir/checkpoints`; give a stable path to resume across
        separate runs (TFX gives every Trainer execution a new `model_run_dir`).
      category_map: `category_map.json` content embedded in the export.
      max_instances: fixed instance padding per image (default: dynamic; 100 on TPU).
      seed: seeds model initialisation and the input pipeline.

    Returns:
      {"start_step", "final_step", "restored_from" (checkpoint path or None), "metrics" (last
      step, floats), "step_time" (mean seconds per step after the first logged interval, or
      None), "serving_dir", "mixed_precision" (the resolved policy, None for float32)}. The
      chief also writes it to `model_dir/training_summary.json`.
    """
    config.validate()
    if isinstance(strategy, str):
        strategy = make_strategy(strategy)
    if max_instances is None and isinstance(strategy, tf.distribute.TPUStrategy):
        max_instances = DEFAULT_TPU_MAX_INSTANCES
    if seed is not None:
        keras.utils.set_random_seed(seed)
    chief = is_chief(strategy)
    mixed_precision = resolve_mixed_precision(
        mixed_precision or config.train.mixed_precision, strategy
    )
    _LOGGER.info("Training precision: %s", mixed_precision or "float32")
    trainer = SOLOv2Trainer(
        config,
        total_steps,
        strategy=strategy,
        mixed_precision=mixed_precision,
        max_positives=max_positives,
    )
    checkpoint_dir = _worker_dir(checkpoint_dir or os.path.join(model_dir, "checkpoints"), chief)
    manager = tf.train.CheckpointManager(trainer.checkpoint, checkpoint_dir, max_to_keep=3)
    restored_from = manager.latest_checkpoint
    if restored_from:
        trainer.checkpoint.restore(restored_from).assert_existing_objects_matched()
        _LOGGER.info("Restored %s at step %d", restored_from, int(trainer.step.numpy()))
    start_step = int(trainer.step.numpy())

    dataset = trainer.distribute(
        lambda ctx, batch: make_dataset(
            train_file_pattern,
            config,
            batch,
            input_context=ctx,
            shuffle_buffer=shuffle_buffer,
            max_instances=max_instances,
            seed=seed,
        )
    )
    writer = (
        tf.summary.create_file_writer(os.path.join(model_dir, "train"))
        if chief
        else tf.summary.create_noop_writer()
    )
    iterator = iter(dataset)
    step = start_step
    metrics: dict[str, float] = {}
    interval_start, interval_steps, timed = time.perf_counter(), 0, []
    while step < total_steps:
        results = trainer.train_step(next(iterator))
        step += 1
        interval_steps += 1
        if step % log_every == 0 or step == total_steps:
            metrics = {key: float(value) for key, value in results.items()}
            elapsed = time.perf_counter() - interval_start
            metrics["images_per_second"] = interval_steps * trainer.global_batch_size / elapsed
            if step - interval_steps > start_step:  # Not the interval holding the tracing.
                timed.append(elapsed / interval_steps)
            _write_summaries(writer, metrics, step)
            _LOGGER.info("step %d/%d %s", step, total_steps, _format(metrics))
            interval_start, interval_steps = time.perf_counter(), 0
        if step % checkpoint_every == 0:
            manager.save(checkpoint_number=step)
    writer.flush()
    if not _saved_at(manager, step):
        manager.save(checkpoint_number=step)
    if not chief:
        tf.io.gfile.rmtree(checkpoint_dir)

    if serving_dir is not None:
        export_dir = serving_dir if chief else tempfile.mkdtemp(prefix="solov2_export_")
        export.export_saved_model(trainer.float32_model(), config.model, export_dir, category_map)
        if not chief:
            tf.io.gfile.rmtree(export_dir)
    result = {
        "start_step": start_step,
        "final_step": step,
        "restored_from": restored_from,
        "metrics": metrics,
        "step_time": sum(timed) / len(timed) if timed else None,
        "serving_dir": serving_dir,
        "mixed_precision": mixed_precision,
    }
    if chief:
        with tf.io.gfile.GFile(os.path.join(model_dir, TRAINING_SUMMARY_FILENAME), "w") as f:
            f.write(json.dumps(result, indent=2, sort_keys=True))
    return result


def _saved_at(manager: tf.train.CheckpointManager, step: int) -> bool:
    latest = manager.latest_checkpoint
    return latest is not None and latest.endswith(f"-{step}")


def _worker_dir(directory: str, chief: bool) -> str:
    """Non-chief workers write (collective) checkpoints to a temporary folder they delete."""
    return directory if chief else tempfile.mkdtemp(prefix="solov2_ckpt_")


def _write_summaries(writer, metrics: Mapping[str, float], step: int) -> None:
    with writer.as_default(step=step):
        for key, value in metrics.items():
            tf.summary.scalar(key, value)


def _format(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


# --------------------------------------------------------------------------------------------
# TFX


def experiment_from_custom_config(custom_config: Mapping | None) -> ExperimentConfig:
    """`experiment` (name, default "demo_cpu") with `overrides` {"model": {...}, "train": {...}}
    (`models.config.apply_overrides`)."""
    custom_config = custom_config or {}
    config = get_experiment(custom_config.get("experiment", "demo_cpu"))
    return apply_overrides(config, custom_config.get("overrides"))


def examples_dir_of(file_pattern: str) -> str:
    """`<examples uri>/Split-train/*` -> `<examples uri>`."""
    return os.path.dirname(os.path.dirname(file_pattern))


def read_json(path: str):
    """A JSON file's content, or None when the file does not exist."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def steps_from_epochs(examples_dir: str, train_config: TrainConfig) -> int:
    """Recipe length in steps: epochs x train images / global batch (SoloTargetGen's report)."""
    report = read_json(os.path.join(examples_dir, features.SOLO_TARGETS_REPORT_FILENAME))
    images = (report or {}).get("splits", {}).get("train", {}).get("images")
    if not images:
        raise ValueError("train_steps not set and no train image count in the targets report")
    return math.ceil(train_config.epochs * images / train_config.batch_size)


def check_targets_match(examples_dir: str, config: ExperimentConfig, split: str = "train") -> None:
    """Raises ValueError when SoloTargetGen made `split`'s targets for another geometry.

    The targets report records each split's `TargetSpec` (grids, scale ranges, sigma, pad,
    variants); training on targets of other grids or scale ranges would not fail, it would
    learn the wrong assignment. Reports written before the spec was recorded are not checked.
    """
    report = read_json(os.path.join(examples_dir, features.SOLO_TARGETS_REPORT_FILENAME))
    made = (report or {}).get("splits", {}).get(split, {}).get("spec")
    if made is None:
        return
    wanted = TargetSpec.from_config(config, split).to_json()
    differences = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
    if differences:
        details = "; ".join(f"{k}: targets {a}, Trainer {b}" for k, (a, b) in differences.items())
        raise ValueError(
            f"the {split} targets were made for another geometry than the Trainer's config "
            f"({details}). Target overrides ({TARGET_FIELDS}) must reach SoloTargetGen too: "
            "pipeline.create_pipeline passes them from TrainingSpec.custom_config['overrides']."
        )


def keyed_checkpoint_dir(custom_config: Mapping, fn_args) -> str | None:
    """`checkpoint_dir/<key>`, the key a hash of this Trainer's inputs and settings.

    TFX gives every Trainer execution a fresh `model_run_dir`, so resuming a killed run needs a
    stable directory; keying it by the input files, the custom config and the step count means
    a re-run of the same execution resumes, while any change starts from scratch.
    """
    base = custom_config.get("checkpoint_dir")
    if not base:
        return None
    identity = {
        "train_files": sorted(fn_args.train_files),
        "train_steps": fn_args.train_steps,
        "custom_config": {k: v for k, v in custom_config.items() if k != "checkpoint_dir"},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(base, digest[:16])


def run_fn(fn_args) -> dict:
    """TFX Trainer entry point (GenericExecutor); see `train` for what it does (and returns).

    custom_config keys: `experiment` (default "demo_cpu"), `overrides`
    ({"model": {...}, "train": {...}}), `strategy` ("auto"), `mixed_precision` (default: the recipe's),
    `checkpoint_every`, `log_every`, `checkpoint_dir` (optional stable path for resuming across
    executions), `seed`. `num_classes` comes from `category_map.json` of the Examples artifact,
    and the class names / COCO ids are embedded in the export.
    """
    custom_config = dict(fn_args.custom_config or {})
    config = experiment_from_custom_config(custom_config)
    examples_dir = examples_dir_of(fn_args.train_files[0])
    category_map = read_json(os.path.join(examples_dir, features.CATEGORY_MAP_FILENAME))
    if category_map is not None:
        num_classes = len(category_map["categories"])
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, num_classes=num_classes)
        ).validate()
    check_targets_match(examples_dir, config)
    total_steps = fn_args.train_steps or steps_from_epochs(examples_dir, config.train)
    return train(
        config,
        list(fn_args.train_files),
        model_dir=fn_args.model_run_dir,
        serving_dir=fn_args.serving_model_dir,
        total_steps=total_steps,
        strategy=custom_config.get("strategy", "auto"),
        mixed_precision=custom_config.get("mixed_precision"),
        checkpoint_every=int(custom_config.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)),
        log_every=int(custom_config.get("log_every", DEFAULT_LOG_EVERY)),
        checkpoint_dir=keyed_checkpoint_dir(custom_config, fn_args),
        category_map=category_map,
        seed=custom_config.get("seed"),
    )
