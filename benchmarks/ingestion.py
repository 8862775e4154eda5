"""Ingestion benchmark: CocoExampleGen throughput and peak memory, printed as JSON.

Runs the real executor (real Beam) on the demo data at several scales (64 images per scale
unit) with the in-memory and the multi-processing DirectRunner, each run in a fresh subprocess.
Memory is the kernel's high-water mark (VmHWM): that of the runner process, reset just before
the run, plus that of every Beam worker process. A brief peak between two samples is never
missed. In multi-processing mode the sum of per-process peaks is an upper bound on the
simultaneous peak of the process tree.

For each runner, a least-squares fit of peak memory against images gives the cost per image
(slope) and the fixed cost (intercept). The slope is reported as a ratio to the mean size of one
serialized example (`peak_per_image_over_example_size`): the issue's bound is about 1.

For comparison, the same runner also runs the stock TFX writer alone: `WriteSplit`
(MaybeSerialize -> Reshuffle -> WriteToTFRecord), which `BaseExampleGenExecutor.Do` applies to
the output of every ExampleGen and which CocoExecutor no longer uses. It is fed incompressible
records of the same size and the same split sizes, made after a shuffle of small elements (as
our task files are spread). Its slope (`stock_writer_alone`) is what that writer would add on
its own; the in-memory runner holds every record at its Reshuffle.

Usage: .venv/bin/python benchmarks/ingestion.py [--scales 1 4 16] [--runners in_memory ...]
    [--repeats N]
About 13 minutes on 2 cores, most of them in multi-processing mode (each worker starts slowly).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = {
    "in_memory": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def _status_mb(pid: int, key: str) -> float:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM, ...) in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


class _PeakMemory:
    """Peak memory of this process (from entry) and of each Beam worker process it starts.

    Each worker's VmHWM is read every 50 ms until it exits. The high-water mark only grows,
    so a late reading is lost only for growth in a worker's last 50 ms. The sum of the
    per-process peaks is an upper bound on the process tree's peak (the processes need not
    peak together); every 50 ms the tree's current RSS is also summed, and the largest sum is
    `tree_sampled_peak_mb`, a lower bound (a peak between two samples is missed).
    """

    def __init__(self):
        self._workers: dict[int, float] = {}
        self._tree_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _PeakMemory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Resets this process's VmHWM to its current RSS (Linux >= 4.0).
        self._rss_before_mb = _status_mb(os.getpid(), "VmRSS")
        self._thread.start()
        return self

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            tree_mb = _status_mb(me.pid, "VmRSS") - self._rss_before_mb
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error, OSError, KeyError):  # It may just exit.
                    if any("sdk_worker_main" in part for part in child.cmdline()):
                        peak = _status_mb(child.pid, "VmHWM")
                        self._workers[child.pid] = max(self._workers.get(child.pid, 0.0), peak)
                        tree_mb += _status_mb(child.pid, "VmRSS")
            self._tree_peak_mb = max(self._tree_peak_mb, tree_mb)
            self._stop.wait(0.05)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._runner_mb = _status_mb(os.getpid(), "VmHWM") - self._rss_before_mb

    def as_json(self) -> dict:
        """`peak_mb`: this process's peak above its RSS before the run (imports are not
        counted), plus the whole peak of each worker (workers live only for the run)."""
        workers = sorted(self._workers.values())
        return {
            "peak_mb": round(self._runner_mb + sum(workers), 1),
            "runner_process_peak_mb": round(self._runner_mb, 1),
            "runner_process_rss_before_mb": round(self._rss_before_mb, 1),
            "worker_peaks_mb": [round(w, 1) for w in workers],
            "tree_sampled_peak_mb": round(self._tree_peak_mb, 1),
        }


def _run_coco(data_dir: str, runner: str, out_dir: str) -> dict:
    """One CocoExampleGen execution (in the subprocess)."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components.coco_example_gen.component import CocoExampleGen, executor_exec_properties
    from components.coco_example_gen.executor import CocoExecutor

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
    executor = CocoExecutor(
        BaseBeamExecutor.Context(beam_pipeline_args=RUNNERS[runner], tmp_dir=out_dir + "_tmp")
    )
    with _PeakMemory() as memory:
        start = time.perf_counter()
        executor.Do({}, {"examples": [examples]}, props)
        seconds = time.perf_counter() - start

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
        "split_images": {s: v["images"] for s, v in report["output_splits"].items()},
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 2),
        "mean_example_bytes": round(serialized_bytes / images),
        **memory.as_json(),
    }


def _synthetic_record(index: int, size: int) -> bytes:
    import random  # Here: workers unpickle this function from `__main__`, without its globals.

    return random.Random(index).randbytes(size)  # Incompressible, like JPEG bytes.


def _run_stock_writer(runner: str, out_dir: str, split_images: str, record_bytes: str) -> dict:
    """The stock `WriteSplit` alone, on records like ours (in the subprocess).

    `split_images` is a JSON object of split name -> record count; each record has
    `record_bytes` bytes. Records stand in for images in the result.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from tfx.components.example_gen.write_split import WriteSplit

    counts = json.loads(split_images)
    pipeline = beam.Pipeline(options=PipelineOptions(RUNNERS[runner]))
    for split, count in counts.items():
        _ = (
            pipeline
            | f"Count[{split}]" >> beam.Create([count])
            | f"Indices[{split}]" >> beam.FlatMap(lambda count: range(count))
            | f"Spread[{split}]" >> beam.Reshuffle()  # As our task files are spread.
            | f"Records[{split}]" >> beam.Map(_synthetic_record, int(record_bytes))
            | f"WriteSplit[{split}]" >> WriteSplit(os.path.join(out_dir, f"Split-{split}"), None)
        )
    with _PeakMemory() as memory:
        pipeline.run().wait_until_finish()
    return {"runner": runner, "images": sum(counts.values()), **memory.as_json()}


def _in_subprocess(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,  # Beam's worker processes import `components` from here.
        env={
            **os.environ,
            "PYTHONPATH": REPO_ROOT,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONWARNINGS": "ignore",
        },
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fit(results: list[dict], key) -> tuple[float, float]:
    """Least-squares (KB per image, fixed MB) of `key(result)` (MB) against images."""
    images = [r["images"] for r in results]
    slope, intercept = np.polyfit(images, [key(r) for r in results], 1)
    return slope * 1024, intercept


def _summary(coco: list[dict], writer: list[dict]) -> dict:
    example_kb = sum(r["mean_example_bytes"] * r["images"] for r in coco) / 1024
    example_kb /= sum(r["images"] for r in coco)
    per_image, fixed = _fit(coco, lambda r: r["peak_mb"])
    runner_per_image, runner_fixed = _fit(coco, lambda r: r["runner_process_peak_mb"])
    workers_per_image, workers_fixed = _fit(coco, lambda r: sum(r["worker_peaks_mb"]))
    sampled_per_image, sampled_fixed = _fit(coco, lambda r: r["tree_sampled_peak_mb"])
    writer_per_image, _ = _fit(writer, lambda r: r["peak_mb"])
    return {
        "images_per_second": {
            f"x{scale}": statistics.median(
                r["images_per_second"] for r in coco if r["scale"] == scale
            )
            for scale in sorted({r["scale"] for r in coco})
        },
        "mean_example_kb": round(example_kb, 2),
        "peak_kb_per_image": round(per_image, 1),
        "peak_per_image_over_example_size": round(per_image / example_kb, 2),
        "fixed_mb": round(fixed, 1),
        # The process tree's RSS sampled every 50 ms: a lower bound, where `peak_kb_per_image`
        # (sum of per-process peaks) is an upper bound; equal for the in-memory runner but
        # for missed samples.
        "tree_sampled_peak": {
            "kb_per_image": round(sampled_per_image, 1),
            "over_example_size": round(sampled_per_image / example_kb, 2),
            "fixed_mb": round(sampled_fixed, 1),
        },
        "runner_process": {
            "kb_per_image": round(runner_per_image, 1),
            "fixed_mb": round(runner_fixed, 1),
        },
        "workers": {
            "kb_per_image": round(workers_per_image, 1),
            "fixed_mb": round(workers_fixed, 1),
        },
        "stock_writer_alone": {
            "kb_per_image": round(writer_per_image, 1),
            "over_example_size": round(writer_per_image / example_kb, 2),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--runners", nargs="+", choices=sorted(RUNNERS), default=list(RUNNERS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per scale; all are fitted")
    parser.add_argument("--coco", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--stock-writer", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.coco:
        print(json.dumps(_run_coco(*args.coco)))
        return
    if args.stock_writer:
        print(json.dumps(_run_stock_writer(*args.stock_writer)))
        return
    if len(set(args.scales)) < 2:
        parser.error("give at least two different --scales to fit a slope")

    sys.path.insert(0, REPO_ROOT)
    from pipeline.demo_data import generate_demo_dataset

    coco, writer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            data_dir = os.path.join(tmp, f"demo_x{scale}")
            generate_demo_dataset(data_dir, num_train=48, num_val=16, scale=scale)
            for runner, repeat in itertools.product(args.runners, range(args.repeats)):
                out = os.path.join(tmp, f"out_{scale}_{runner}_{repeat}")
                result = _in_subprocess("--coco", data_dir, runner, out)
                coco.append({"scale": scale, **result})
                out = os.path.join(tmp, f"writer_{scale}_{runner}_{repeat}")
                split_images = json.dumps(result["split_images"])
                size = str(result["mean_example_bytes"])
                writer.append(
                    {
                        "scale": scale,
                        **_in_subprocess("--stock-writer", runner, out, split_images, size),
                    }
                )

    summary = {"coco_example_gen": coco, "stock_writer": writer}
    for runner in args.runners:
        summary[runner] = _summary(
            [r for r in coco if r["runner"] == runner], [r for r in writer if r["runner"] == runner]
        )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
