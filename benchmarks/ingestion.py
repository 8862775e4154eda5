"""Ingestion benchmark: CocoExampleGen throughput and peak memory, printed as JSON.

Runs the real executor (real Beam) on the demo data at 1x and 4x, with the in-memory and the
multi-processing DirectRunner, each configuration in a fresh subprocess whose whole process
tree is sampled for resident memory. The comparison that matters is within the run:

  extra_peak_per_image = (peak_4x - peak_1x) / (images_4x - images_1x)

against the mean size of one serialized example. Peak memory may grow with the data by about
one encoded example per image (the Reshuffle inside the stock writer holds encoded examples),
but never by decoded pixels.

Usage: .venv/bin/python benchmarks/ingestion.py [--scales 1 4]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = {
    "in_memory": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # A worker may exit while we look.
            total += p.memory_info().rss
    return total


def _one(data_dir: str, runner: str, out_dir: str) -> dict:
    """Runs inside the subprocess: one ExampleGen execution, sampled for peak tree RSS."""
    sys.path.insert(0, REPO_ROOT)
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components.coco_example_gen.component import CocoExampleGen, executor_exec_properties
    from components.coco_example_gen.executor import CocoExecutor

    me = psutil.Process()
    baseline = _tree_rss(me)
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(me))
            time.sleep(0.05)

    component = CocoExampleGen(
        data_dir,
        split_files={
            "train": "annotations/instances_train.json",
            "eval": "annotations/instances_val.json",
        },
    )
    props = executor_exec_properties(component)
    examples = standard_artifacts.Examples()
    examples.uri = out_dir
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    CocoExecutor(
        BaseBeamExecutor.Context(beam_pipeline_args=RUNNERS[runner], tmp_dir=out_dir + "_tmp")
    ).Do({}, {"examples": [examples]}, props)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    with open(os.path.join(out_dir, "ingestion_report.json")) as f:
        report = json.load(f)
    images = report["images"]["written"]
    import tensorflow as tf

    files = glob.glob(os.path.join(out_dir, "Split-*", "*.gz"))
    serialized_bytes = sum(
        len(r.numpy()) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")
    )
    return {
        "runner": runner,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 2),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "rss_before_run_mb": round(baseline / 2**20, 1),
        "mean_example_kb": round(serialized_bytes / images / 1024, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--one", nargs=3, metavar=("DATA_DIR", "RUNNER", "OUT_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(*args.one)))
        return

    sys.path.insert(0, REPO_ROOT)
    from pipeline.demo_data import generate_demo_dataset

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            data_dir = os.path.join(tmp, f"demo_x{scale}")
            generate_demo_dataset(data_dir, scale=scale)
            for runner in RUNNERS:
                out_dir = os.path.join(tmp, f"out_{scale}_{runner}")
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", data_dir, runner, out_dir],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"},
                )
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["scale"] = scale
                results.append(result)

    summary = {"results": results}
    lo, hi = min(args.scales), max(args.scales)
    for runner in RUNNERS:
        a = next(r for r in results if r["runner"] == runner and r["scale"] == lo)
        b = next(r for r in results if r["runner"] == runner and r["scale"] == hi)
        if b["images"] > a["images"]:
            extra_kb = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / (b["images"] - a["images"])
            summary[f"{runner}_extra_peak_kb_per_image"] = round(extra_kb, 2)
            summary[f"{runner}_extra_peak_per_image_over_example_size"] = round(
                extra_kb / b["mean_example_kb"], 2
            )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
