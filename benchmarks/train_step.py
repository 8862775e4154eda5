"""Trainer step time with the real input pipeline vs the same step on a cached batch.

Prints one JSON object. The pipeline is the trainer's own (`models.train.make_dataset`: gzip
TFRecords of SoloTargetGen examples -> parse -> JPEG decode -> resize/normalise/pad -> target
variant -> padded_batch -> prefetch, distributed by the default strategy), fed to
`SOLOv2Trainer.train_step`. The cached run repeats one batch already in memory. Both are timed in
alternating blocks (median of per-block means, after warm-up) so that machine load hits both
alike; input overhead = pipeline / cached - 1. Goal: <= 10%. In the same blocks, the cached
batch also goes through a second trainer whose loss keeps its positive buffer static
(`max_positives` slots per image, as on TPU); the cached step above cuts it to the batch's
positive count. And the cached batch padded to the square P x P (the training pad before
`TrainConfig.orientation_pad`) goes through the first trainer: the cost of the square pad. And a
third trainer, the same model with the standard ResNet width (`backbone_width=64`), takes the
cached batch: what the experiment's backbone width saves (`demo_cpu`'s is 32). On a CPU-only
machine the input pipeline and the step share the same cores, which a GPU/TPU host does not.

    .venv/bin/python -m benchmarks.train_step [--experiment demo_cpu] [--batch-size 4]
        [--examples-dir DIR] [--blocks 3] [--steps 8]

Without `--examples-dir`, 16 demo images go through CocoExampleGen + TargetMaker first
(`tests/train_utils.py`), with the experiment's target variants.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import tensorflow as tf

from models.config import STANDARD_BACKBONE_WIDTH, get_experiment
from models.preprocess import padded_size
from models.train import SOLOv2Trainer, make_dataset, resolve_mixed_precision


def _time_block(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        metrics = step()
    float(metrics["total_loss"])  # Wait for the last step.
    return (time.perf_counter() - start) / steps


def run(experiment: str, batch_size: int, examples_dir: str | None, blocks: int, steps: int):
    config = get_experiment(experiment)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, batch_size=batch_size)
    )
    if examples_dir is None:
        from tests.train_utils import build_training_examples

        examples_dir = build_training_examples(
            tempfile.mkdtemp(prefix="bench_train_step_"), config, num_train=16, num_val=1
        )
    pattern = os.path.join(examples_dir, "Split-train", "*")

    precision = resolve_mixed_precision(config.train.mixed_precision)  # as `models.train.train`

    def dataset_fn(ctx, batch):
        return make_dataset(pattern, config, batch, input_context=ctx)

    trainer = SOLOv2Trainer(config, total_steps=10_000, mixed_precision=precision)
    # The same step with the loss's positive buffer kept static (`max_positives` slots per
    # image, as on TPU) instead of cut to the batch's positive count; timed on the cached batch.
    static = SOLOv2Trainer(
        config, total_steps=10_000, mixed_precision=precision, static_shapes=True
    )
    # The same model with the standard ResNet width, for what a narrower backbone saves.
    standard_config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, backbone_width=STANDARD_BACKBONE_WIDTH)
    )
    standard = SOLOv2Trainer(standard_config, total_steps=10_000, mixed_precision=precision)
    dataset = trainer.distribute(dataset_fn)
    static.distribute(dataset_fn)
    standard.distribute(dataset_fn)
    iterator = iter(dataset)
    cached = next(iterator)
    # The same batch padded to the square P x P, as every image was before `orientation_pad`
    # (the cost of the pad; the targets stay those of the orientation pad).
    pad = padded_size(config.train.train_max_size)
    square = dict(cached)
    square["images"] = tf.image.pad_to_bounding_box(cached["images"], 0, 0, pad, pad)
    masks = cached["instance_masks"]
    square["instance_masks"] = tf.pad(
        masks, [[0, 0], [0, 0], [0, pad // 4 - masks.shape[2]], [0, pad // 4 - masks.shape[3]]]
    )
    for _ in range(3):  # Warm-up: tracing, allocations, pipeline autotuning.
        trainer.train_step(next(iterator))
        trainer.train_step(cached)
        trainer.train_step(square)
        static.train_step(cached)
        standard.train_step(cached)

    pipeline_times, cached_times, static_times, square_times = [], [], [], []
    standard_times = []
    for _ in range(blocks):
        pipeline_times.append(_time_block(lambda: trainer.train_step(next(iterator)), steps))
        cached_times.append(_time_block(lambda: trainer.train_step(cached), steps))
        static_times.append(_time_block(lambda: static.train_step(cached), steps))
        square_times.append(_time_block(lambda: trainer.train_step(square), steps))
        standard_times.append(_time_block(lambda: standard.train_step(cached), steps))

    # Input pipeline alone, on a fresh iterator (past its first batches, which only fill buffers).
    fresh = iter(dataset)
    for _ in range(3):
        next(fresh)
    start = time.perf_counter()
    input_batches = 5 * steps
    for _ in range(input_batches):
        next(fresh)
    input_only = (time.perf_counter() - start) / input_batches

    pipeline_step = statistics.median(pipeline_times)
    cached_step = statistics.median(cached_times)
    static_step = statistics.median(static_times)
    square_step = statistics.median(square_times)
    standard_step = statistics.median(standard_times)
    return {
        "experiment": experiment,
        "batch_size": batch_size,
        "image_pad": config.train.train_max_size,
        "mixed_precision": precision,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "blocks_x_steps": [blocks, steps],
        "pipeline_step_s": round(pipeline_step, 4),
        "cached_step_s": round(cached_step, 4),
        "input_overhead_pct": round(100 * (pipeline_step / cached_step - 1), 1),
        "input_pipeline_only_batch_s": round(input_only, 4),
        "pipeline_step_blocks_s": [round(t, 4) for t in pipeline_times],
        "cached_step_blocks_s": [round(t, 4) for t in cached_times],
        "goal_overhead_pct": 10,
        "positives_in_cached_batch": int(
            tf.reduce_sum(tf.cast(cached["cell_class"] >= 0, tf.int32))
        ),
        "cached_step_static_buffer_s": round(static_step, 4),
        "static_over_trimmed": round(static_step / cached_step, 3),
        "cached_batch_pad": list(cached["images"].shape[1:3]),
        "cached_step_square_pad_s": round(square_step, 4),
        "square_over_orientation_pad": round(square_step / cached_step, 3),
        "backbone_width": config.model.backbone_width,
        "cached_step_standard_width_s": round(standard_step, 4),
        "standard_width_over_experiment": round(standard_step / cached_step, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="demo_cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--examples-dir", help="a SoloTargetGen Examples dir (Split-train/*.gz)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    args = parser.parse_args()
    report = run(args.experiment, args.batch_size, args.examples_dir, args.blocks, args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
