"""Training throughput of bnjax, side by side with Keras 3 (TensorFlow) and PyTorch.

    python -m benchmarks.throughput                 # bnjax: plain and BN train steps/s, compile, eval
    python -m benchmarks.throughput --peers         # + Keras 3 on TF and PyTorch, same model, same run
    python -m benchmarks.throughput --sweep         # + the article sweep end to end (bnjax vs. Keras)
    python -m benchmarks.throughput --json          # one JSON object instead of the table

Steady-state steps/s: each measurement trains a short run (WARMUP steps) and a
long one (WARMUP + --steps) from scratch and divides the extra steps by the
extra training time, so setup and graph building cancel out (bnjax runs of
one setting share their compiled step: a first long run, timed on its own,
compiles it, and gives the compile time). The
implementations take turns, --repeats times, so all see the same machine
noise; medians are reported. Batch 32, the article's CNN, relu, Adam 0.001.
These machines are noisy: compare figures from one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from bnjax.data.datasets import load_mnist
from bnjax.engine.launch import train_many
from bnjax.engine.strategy import default_strategy
from bnjax.support import host
from bnjax.support.provenance import environment
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import evaluate
from bnjax.training.steps import create_train_state, train_step
from bnjax.training.train import train
from benchmarks import peers

WARMUP = 50
FMA_PEAK_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
FMA_PEAK_ITERATIONS = 500_000_000  # ~1 s per core


def cpu_peak_gflops() -> tuple[float | None, str]:
    """This CPU's fp32 peak, measured: `fma_peak.c` (nothing but independent
    vector FMAs) built for this CPU and run on every core at once, summed. A
    nominal cores x clock x FLOP/cycle needs the number of FMA pipes and the
    boost clock, which /proc/cpuinfo does not tell (on our 2-core Xeon it says
    2.6 GHz while the cores run FMAs at 3.5-3.7 GHz, 64 FLOP/cycle)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler to build benchmarks/fma_peak.c"
    with tempfile.TemporaryDirectory() as build_dir:
        binary = os.path.join(build_dir, "fma_peak")
        build = subprocess.run([compiler, "-O3", "-march=native", FMA_PEAK_SOURCE, "-o", binary],
                               capture_output=True, text=True)
        if build.returncode:
            return None, f"benchmarks/fma_peak.c did not build: {(build.stderr.strip().splitlines() or ['?'])[-1]}"
        cores = host.core_ids_to_hand_out()
        runs = [subprocess.Popen([binary, str(FMA_PEAK_ITERATIONS), str(core)], stdout=subprocess.PIPE, text=True)
                for core in cores]
        outputs = [run.communicate()[0].split() for run in runs]
    per_core = [float(output[0]) for output in outputs]
    return sum(per_core), (f"benchmarks/fma_peak.c, {outputs[0][1]}-bit FMAs on {len(cores)} cores at once: "
                           f"{' + '.join(f'{gflops:.0f}' for gflops in per_core)} GFLOP/s")


def xla_matmul_gflops(size: int = 2048) -> float:
    """The best fp32 rate XLA reaches here: a size x size matrix product."""
    a = jax.numpy.ones((size, size), jax.numpy.float32)
    product = jax.jit(lambda a, b: a @ b)
    product(a, a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def train_step_flops(batch_norm: bool) -> float:
    """FLOPs of one train step (forward + backward + Adam), from XLA's cost analysis."""
    config = TrainConfig(batch_norm=batch_norm)
    state = create_train_state(config, jax.random.key(0))
    images, labels = np.zeros((32, 28, 28, 1), np.float32), np.zeros((32,), np.int32)
    cost = train_step.lower(state, images, labels).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def bnjax_seconds(batch_norm: bool, data, steps: int) -> float:
    config = TrainConfig(batch_norm=batch_norm, activation="relu", max_steps=steps, eval_every=10**9)
    history, _ = train(config, data)
    return history.total_wall_time_s - history.eval_time_s


def rate(seconds_of, steps: int) -> tuple[float, float]:
    """(steady steps/s, seconds of the short run beyond its steady share: setup, and
    compilation where the implementation compiles each run anew)."""
    short = seconds_of(WARMUP)
    long = seconds_of(WARMUP + steps)
    steps_per_s = steps / (long - short)
    return steps_per_s, short - WARMUP / steps_per_s


def eval_seconds(data, chunk: int | None) -> float:
    """Evaluating the 10,000 test images in batches of 1000 (the default
    `eval_batch_size`), each in pieces of `chunk` (None: whole)."""
    state = create_train_state(TrainConfig(batch_norm=True), jax.random.key(0))
    test_images, test_labels = jax.device_put((data.x_test, data.y_test))
    evaluate(state, test_images, test_labels, chunk=chunk)  # compile
    times = []
    for _ in range(3):
        start = time.perf_counter()
        evaluate(state, test_images, test_labels, chunk=chunk)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_seconds(data, epochs: int) -> dict:
    """The article grid (3 settings x plain/BN, 1 seed), curves every 100 steps, end to end."""
    from experiments.article import sweep_configs

    configs = sweep_configs("article", seeds=1, epochs=epochs, max_steps=None)
    strategy = default_strategy(jax.devices()[0].platform)
    with HostMemorySampler() as memory:
        start = time.perf_counter()
        results = train_many(configs, data, strategy=strategy)
        seconds = time.perf_counter() - start
    return {"runs": len(configs), "epochs": epochs, "seconds": seconds,
            "points_per_curve": len(results[0][0].steps), "parallel_runs": strategy.parallel_runs,
            "peak_host_memory_mb": memory.peak_mb}


def keras_sweep_seconds(data, epochs: int) -> dict:
    from experiments.article import GRIDS

    start = time.perf_counter()
    for learning_rate, activation in GRIDS["article"]:
        for batch_norm in (False, True):
            peers.keras_run(data.x_train, data.y_train, data.x_test, data.y_test, batch_norm, activation,
                            learning_rate, epochs)
    return {"runs": 2 * len(GRIDS["article"]), "epochs": epochs, "seconds": time.perf_counter() - start,
            "points_per_curve": epochs}


def measure(args) -> dict:
    data = load_mnist()
    device = jax.devices()[0]
    # The bnjax sweep first, while this process holds no TensorFlow or PyTorch,
    # so that its memory figure is bnjax's own.
    sweep = {"bnjax": {**sweep_seconds(data, args.sweep_epochs), **device_memory_figures(device)}} if args.sweep else {}
    implementations = {"bnjax": lambda bn: (lambda steps: bnjax_seconds(bn, data, steps))}
    skipped = {}
    if args.peers:
        for peer, reason in peers.available().items():
            if reason:
                skipped[peer] = reason
            elif peer == "keras-tf":
                implementations[peer] = lambda bn: (lambda steps: peers.keras_train_seconds(
                    peers.keras_model(bn), data.x_train, data.y_train, steps))
            else:
                # PyTorch on the same kind of device as bnjax (its eager GPU path when JAX has a GPU).
                torch_device = "cuda" if device.platform == "gpu" else "cpu"
                implementations[peer] = lambda bn: (lambda steps: peers.torch_train_seconds(
                    peers.torch_model(bn), data.x_train, data.y_train, steps, device=torch_device))
    rates = {name: {False: [], True: []} for name in implementations}
    # bnjax runs of one setting share their compiled step (bnjax/training/steps.py), so the
    # first run compiles and later ones do not: time a first long run on its own
    # (it compiles the step and the evaluation), then measure rates
    # from runs that all reuse its compiled steps.
    first_run_s = {batch_norm: bnjax_seconds(batch_norm, data, WARMUP + args.steps) for batch_norm in (False, True)}
    overhead_s = {False: [], True: []}  # a short run's seconds beyond its steady share: setup
    for _ in range(args.repeats):
        for name, seconds_for in implementations.items():
            for batch_norm in (False, True):
                steps_per_s, overhead = rate(seconds_for(batch_norm), args.steps)
                rates[name][batch_norm].append(steps_per_s)
                if name == "bnjax":
                    overhead_s[batch_norm].append(overhead)
    median = lambda values: statistics.median(values)  # noqa: E731
    peak, peak_how = cpu_peak_gflops() if device.platform == "cpu" else (None, "not a CPU")
    flops = {bn: train_step_flops(bn) for bn in (False, True)}
    result = {
        "device": f"{device.device_kind} ({device.platform})",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "jax": jax.__version__,
        "strategy": dataclasses.asdict(default_strategy(device.platform)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "batch_size": 32,
        "plain_steps_per_s": median(rates["bnjax"][False]),
        "bn_steps_per_s": median(rates["bnjax"][True]),
        "compile_s": median([first_run_s[bn] - (WARMUP + args.steps) / median(rates["bnjax"][bn])
                             - median(overhead_s[bn]) for bn in (False, True)]),
        "setup_s": median(overhead_s[False] + overhead_s[True]),
        "eval_10k_s": eval_seconds(data, default_strategy(device.platform).eval_chunk),
        "eval_10k_whole_batches_s": eval_seconds(data, None),
        "train_step_gflop": {"plain": flops[False] / 1e9, "bn": flops[True] / 1e9},
        "cpu_peak_gflops": peak,
        "cpu_peak_how": peak_how,
        "xla_matmul_2048_gflops": xla_matmul_gflops(),
        "repeats": args.repeats,
        "steps": args.steps,
        "all_steps_per_s": {name: {"plain": r[False], "bn": r[True]} for name, r in rates.items()},
        "peers_skipped": skipped,
    }
    for name in implementations:
        if name != "bnjax":
            result[f"{name}_plain_steps_per_s"] = median(rates[name][False])
            result[f"{name}_bn_steps_per_s"] = median(rates[name][True])
    if peak:
        result["share_of_peak"] = {kind: result[f"{kind}_steps_per_s"] * flops[bn] / 1e9 / peak
                                   for kind, bn in (("plain", False), ("bn", True))}
    if args.sweep:
        result["sweep"] = sweep
        if "keras-tf" in implementations:
            result["sweep"]["keras-tf"] = keras_sweep_seconds(data, args.sweep_epochs)
    return result


class HostMemorySampler:
    """Peak resident memory of this process plus its child processes (the
    engine's workers), sampled from /proc every `interval_s` while active.
    (ru_maxrss cannot tell: a child's high-water mark starts from its parent's
    size at fork and survives exec.) Linux only; a kernel without
    /proc/PID/task/PID/children lists gives this process's memory alone."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb(pid: int | str) -> float:
        try:
            with open(f"/proc/{pid}/status") as status:
                return next(float(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return 0.0

    def _children(self) -> list[str]:
        """Child PIDs of every thread of this process (a child belongs to the thread that started it)."""
        children = []
        for thread in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
            try:
                with open(thread) as listing:
                    children += listing.read().split()
            except OSError:
                pass
        return children

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = self._rss_mb(os.getpid()) + sum(self._rss_mb(child) for child in self._children())
            self.peak_mb = max(self.peak_mb, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "HostMemorySampler":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def device_memory_figures(device) -> dict:
    """Peak device memory, where the backend reports it (GPU, TPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_device_memory_mb": stats["peak_bytes_in_use"] / 2**20}
    return {}


def print_table(result: dict) -> None:
    print(f"device: {result['device']}; {result['machine']}; jax {result['jax']}; strategy {result['strategy']}")
    print(f"XLA_FLAGS: {result['xla_flags'] or '(none)'}")
    print(f"train steps/s, batch 32, median of {result['repeats']} (steady state, {result['steps']} steps):")
    names = list(result["all_steps_per_s"])
    print(f"  {'':10s} {'plain':>8s} {'BN':>8s}   bnjax is ... x faster (plain / BN)")
    for name in names:
        plain, bn = (statistics.median(result["all_steps_per_s"][name][k]) for k in ("plain", "bn"))
        ratio = "" if name == "bnjax" else (f"   {result['plain_steps_per_s'] / plain:.2f} / "
                                            f"{result['bn_steps_per_s'] / bn:.2f}")
        print(f"  {name:10s} {plain:8.1f} {bn:8.1f}{ratio}")
    for peer, reason in result["peers_skipped"].items():
        print(f"  {peer:10s} skipped: {reason}")
    print(f"compile: {result['compile_s']:.1f} s (first run only); setup of a run: {result['setup_s']:.2f} s; "
          f"evaluating 10,000 test images: {result['eval_10k_s']:.2f} s "
          f"(batches of 1000 at once: {result['eval_10k_whole_batches_s']:.2f} s)")
    gflop = result["train_step_gflop"]
    print(f"one train step: {gflop['plain']:.3f} GFLOP plain, {gflop['bn']:.3f} GFLOP BN (XLA cost analysis)")
    if result.get("share_of_peak"):
        share = result["share_of_peak"]
        print(f"CPU fp32 peak {result['cpu_peak_gflops']:.0f} GFLOP/s ({result['cpu_peak_how']}): "
              f"plain {share['plain']:.0%}, BN {share['bn']:.0%} of it")
    print(f"for scale: a 2048 x 2048 fp32 matrix product through XLA runs at {result['xla_matmul_2048_gflops']:.0f} GFLOP/s")
    for name, sweep in result.get("sweep", {}).items():
        memory = "".join(f", {key.replace('_', ' ')} {value:.0f}" for key, value in sweep.items() if key.endswith("_mb"))
        print(f"article sweep ({sweep['runs']} runs x {sweep['epochs']} epochs, {sweep['points_per_curve']} points per "
              f"curve), {name}: {sweep['seconds']:.0f} s{memory}")
    if {"bnjax", "keras-tf"} <= set(result.get("sweep", {})):
        print(f"  bnjax is {result['sweep']['keras-tf']['seconds'] / result['sweep']['bnjax']['seconds']:.2f}x "
              "faster than Keras on the sweep")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="steps per steady-state measurement (default 500)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", action="store_true", help="also time Keras 3 on TF and PyTorch if installed")
    parser.add_argument("--sweep", action="store_true", help="also time the article sweep end to end")
    parser.add_argument("--sweep-epochs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "sweep_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    result = measure(args)
    if args.json:
        result["environment"] = environment()  # versions, device, CPU and the bnjax commit
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print_table(result)


if __name__ == "__main__":
    main()
