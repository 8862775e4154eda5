"""CPU forward latency and FLOP efficiency of SOLOv2 (R50-FPN at 800x1333, Light-448-R50).

Prints one JSON object. Per model: batch-1 latency of `model(images, training=False)` inside a
`tf.function` (after warm-up), FLOPs, and achieved FLOP/s as a fraction of the FLOP/s of a large
square `tf.matmul` measured in the same run (a practical peak for this machine).

FLOPs are counted by `tf.compat.v1.profiler` (`float_operation`) on the traced graph of the
concrete function: the sum of the registered FLOP statistics of its ops (Conv2D, MatMul,
BiasAdd, elementwise ops, ...), a multiply-add counting as 2 FLOPs. Image sizes are padded to
multiples of 32 as the model requires (800x1333 -> 800x1344). Only the network forward is timed;
Matrix NMS and mask post-processing are not part of the model.

Usage: python -m benchmarks.forward_latency [--repeats 3]
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import tensorflow as tf

from models.config import get_experiment
from models.solov2 import build_model

CASES = (
    # experiment, (height, width) before padding
    ("solov2_r50_fpn_1x", (800, 1333)),
    ("solov2_light_448_r50", (448, 768)),
)


def _pad32(size: int) -> int:
    return -(-size // 32) * 32


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def graph_flops(concrete_function) -> int:
    """FLOPs of a concrete function's graph according to the TF profiler."""
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=concrete_function.graph, options=options)
    return int(profile.total_float_ops)


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul (2 n^3 FLOPs), best of `repeats`."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    matmul()  # warm-up
    return 2 * n**3 / min(_time(lambda: matmul().numpy(), repeats))


def benchmark(name: str, size: tuple[int, int], repeats: int, peak: float) -> dict:
    model = build_model(get_experiment(name).model)
    height, width = _pad32(size[0]), _pad32(size[1])
    spec = tf.TensorSpec((1, height, width, 3), tf.float32)
    forward = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    concrete = forward.get_concrete_function()
    flops = graph_flops(concrete)
    images = tf.constant(
        np.random.default_rng(0).standard_normal((1, height, width, 3)), tf.float32
    )

    def run():
        return {key: value.numpy() for key, value in forward(images).items()}

    run()  # warm-up (graph optimisation, allocations)
    times = _time(run, repeats)
    median = statistics.median(times)
    return {
        "experiment": name,
        "input_hw": [height, width],
        "requested_hw": list(size),
        "params": int(model.count_params()),
        "latency_ms_median": round(1000 * median, 1),
        "latency_ms_all": [round(1000 * t, 1) for t in times],
        "gflops": round(flops / 1e9, 2),
        "achieved_gflops_per_s": round(flops / median / 1e9, 2),
        "fraction_of_matmul_peak": round(flops / median / peak, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model")
    args = parser.parse_args()
    peak = matmul_flops_per_second()
    results = [benchmark(name, size, args.repeats, peak) for name, size in CASES]
    report = {
        "tensorflow": tf.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "flops_method": "tf.compat.v1.profiler float_operation on the traced forward graph",
        "matmul_2048_gflops_per_s": round(peak / 1e9, 2),
        "models": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
