"""Every program bnjax runs, compiled for Colab's TPUs on this CPU, with what
XLA says each costs there: no TPU needed, only libtpu from the package
registry (`pip install "jax[tpu]==<the installed jax>"`), which compiles for
a TPU topology described by `jax.experimental.topologies` ("deviceless AOT",
as MaxText's train_compile.py does).

    python -m benchmarks.tpu_programs                  # -> outputs/benchmarks/tpu_programs.json, a table on stdout
    python -m benchmarks.tpu_programs --topologies v5e-1 --out /tmp/v5e.json

For each topology (Colab's v5e-1, v6e-1 and v2-8, and a v5e-16 pod slice of
4 hosts) and each program — the plain loop's train step and evaluation, the
engine's interval program for one run and for stacked runs, precise-BN and
batch-statistics evaluation, ghost BN, Batch Renorm, the BN-LSTM, bfloat16,
and a run split over every chip (or core) with synchronized BN — it records
whether the program compiled (or the compiler's error), the HBM it needs
(`memory_analysis`) against the device's HBM, FLOPs and HBM bytes per call
(`cost_analysis`), and the time these imply at the device's published peak:
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), a roofline *lower bound*,
beside libtpu's own estimate (`optimal_seconds`). None of it is a measured
time: every seconds figure here is a projection.

It also chooses the engine's strategy for a TPU (`default_strategy("tpu")`)
from the compiled cost: the train step of R stacked runs, R = 1 .. 64, with
XLA's grouped convolution and with patches and a batched matrix product,
priced per run-step, and the evaluation in one piece or in chunks; and it
projects the article's sweep (18 runs of 5625 steps, evaluated every 100
steps, precise BN on the BN runs) on each topology with that strategy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnjax.engine import launch, loop
from bnjax.engine.strategy import Strategy, default_strategy
from bnjax.support.atomic import write_json
from bnjax.support.provenance import environment
from bnjax.training import evaluation
from bnjax.nets.recurrent import sequence_length
from bnjax.bn.batchnorm import Renorm
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.runs import stack_runs
from bnjax.training.schedule import resolve_steps
from bnjax.training.steps import DATA_AXIS, create_train_state, matmul_precision, train_step

DEFAULT_OUT = Path("outputs/benchmarks/tpu_programs.json")

# Per JAX device (one TensorCore: a v2 chip has two, v5e and v6e one): HBM,
# HBM bandwidth and bf16 peak, as published in JAX's TPU hardware reference
# (docs.jax.dev/en/latest/pallas/tpu/hardware.html; the same figures as
# `jax.experimental.pallas.tpu.get_tpu_info_for_chip`, which
# tests/test_tpu_programs.py holds this table to) and Google Cloud's pages
# (cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB, 819 GB/s per chip;
# /v6e: 918 TFLOP/s, 32 GB, 1640 GB/s; /v2 and Jouppi et al., CACM 2020:
# 46 TFLOP/s, 16 GiB, 700 GB/s per chip of two cores). float32 products run
# as bfloat16 passes at JAX's default precision, so the bf16 peak applies.
CHIPS = {
    "v5e": {"hbm_bytes": 17.2e9, "hbm_bytes_per_s": 820e9, "peak_flops": 197e12},
    "v6e": {"hbm_bytes": 34.4e9, "hbm_bytes_per_s": 1640e9, "peak_flops": 920e12},
    "v2": {"hbm_bytes": 8.0e9, "hbm_bytes_per_s": 358e9, "peak_flops": 23e12},
}
CHIPS_SOURCE = ("docs.jax.dev/en/latest/pallas/tpu/hardware.html (per TensorCore; "
                "jax.experimental.pallas.tpu.get_tpu_info_for_chip)")

# Colab's TPU runtimes and a pod slice: topology name for
# jax.experimental.topologies, chips per host (None: libtpu's default), chip.
TOPOLOGIES = {
    "v5e-1": ("v5e:1x1", (1, 1, 1), "v5e"),
    "v6e-1": ("v6e:1x1", (1, 1, 1), "v6e"),
    "v2-8": ("v2:2x2", None, "v2"),
    "v5e-16": ("v5e:4x4", None, "v5e"),  # a pod slice: 4 hosts of 4 chips
}

BN = TrainConfig(batch_norm=True, activation="sigmoid")  # the article's BN net
LSTM = TrainConfig(model="lstm", batch_norm=True)  # the BN-LSTM reading an image row by row
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000  # MNIST
STACKS = (1, 2, 4, 8, 16, 32, 64)  # runs per program priced for the strategy
EVAL_CHUNKS = (None, 100, 200)  # an evaluation batch of 1000 at once or in pieces
# The strategy takes the fewest runs per program whose projected time per
# run-step is within this of the best: more runs per program only helps a
# sweep that has that many runs of one program.
WITHIN_BEST = 0.05
# The TPU (and GPU) default before the TPU strategy was chosen from these costs.
STACKED_64_MATMUL = Strategy(steps_per_dispatch=100, models_per_program=64, eval_chunk=None, stacked_conv="matmul")


def topology_devices(name: str):
    from jax.experimental import topologies

    topology_name, per_host, _ = TOPOLOGIES[name]
    kwargs = {} if per_host is None else {"chips_per_host_bounds": per_host}
    return list(topologies.get_topology_desc(topology_name, "tpu", **kwargs).devices)


def abstract(tree, sharding):
    """`tree`'s arrays as shapes and dtypes placed by `sharding` (what `lower` needs)."""
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), jnp.asarray(leaf).dtype, sharding=sharding), tree)


def uint8_images(count: int):
    return jax.ShapeDtypeStruct((count, 28, 28, 1), jnp.uint8)


def labels(count: int):
    return jax.ShapeDtypeStruct((count,), jnp.int32)


def with_sharding(tree, sharding):
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)


def stacked_state(config: TrainConfig, runs: int, conv: str, num_devices: int = 1):
    """`runs` fresh states stacked, their model built for `num_devices` (several: BN
    averages its statistics over them, as `lifecycle.start` builds it for a mesh)."""
    states = [create_train_state(dataclasses.replace(config, seed=seed), jax.random.key(seed), num_devices,
                                 conv_implementation=conv if runs > 1 else "lax") for seed in range(runs)]
    return stack_runs(states)


# ---------------------------------------------------------------- the programs

def engine_interval(config: TrainConfig, devices, runs: int = 1, conv: str = "lax", loop_kind: str = "while"):
    """The engine's interval program (`loop._train_chunk`): `runs` stacked runs,
    their batch split over `devices` (several: synchronized BN over them)."""
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    replicated = NamedSharding(mesh, P())
    steps_per_epoch, total_steps = resolve_steps(config, TRAIN_SIZE)
    window = loop._orders_window(steps_per_epoch, total_steps, config.eval_every)
    state = abstract(stacked_state(config, runs, conv, len(devices)), replicated)
    sums = abstract({"loss": np.zeros(runs, np.float32), "accuracy": np.zeros(runs, np.float32)}, replicated)
    data = loop.StepData(*with_sharding((uint8_images(TRAIN_SIZE), labels(TRAIN_SIZE),
                                         jax.ShapeDtypeStruct((runs, window, TRAIN_SIZE), jnp.int32),
                                         jax.ShapeDtypeStruct((), jnp.int32)), replicated))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    plan = loop.StepPlan(steps_per_epoch, config.batch_size, mesh, config.ghost_bn, loop_kind)
    return [(loop._train_chunk, (state, sums, data, step, step, plan), 1)]  # "while": its body, one step


def plain_train_step(config: TrainConfig, device):
    """The plain loop's `train_step` on one device."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    state = abstract(create_train_state(config, jax.random.key(0)), sharding)
    images = jax.ShapeDtypeStruct((config.batch_size, 28, 28, 1), jnp.float32, sharding=sharding)
    # The LSTM's step is two scans over the sequence (forward, backward), each body counted once.
    trips = sequence_length(config.sequence) if config.model == "lstm" else 1
    return [(train_step, (state, images, jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding)),
             trips)]


def evaluation_program(config: TrainConfig, device, statistics: str, runs: int = 1, conv: str = "lax",
                       chunk: int | None = None):
    """One evaluation of `runs` stacked runs over the whole test set, with the
    running averages, precise BN statistics or batch statistics."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    state = abstract(stacked_state(config, runs, conv), sharding)
    test = with_sharding((uint8_images(TEST_SIZE), labels(TEST_SIZE)), sharding)
    batches = TEST_SIZE // config.eval_batch_size  # the scan over the test set's batches, counted once
    pieces = config.eval_batch_size // chunk if chunk and config.eval_batch_size % chunk == 0 else 1
    running = (evaluation._running_totals, (state, *test, config.eval_batch_size, chunk), batches * pieces)
    if statistics == "running":
        return [running]
    if statistics == "precise":  # the statistics (a map over the training batches), then the running-average door
        precise_batches = jax.ShapeDtypeStruct((config.precise_bn_batches, config.batch_size, 28, 28, 1),
                                               jnp.float32, sharding=sharding)
        return [(evaluation._precise_batch_stats_of_runs, (state, precise_batches), config.precise_bn_batches),
                running]
    return [(evaluation._batch_statistics_totals_over_set, (state, *test, config.eval_batch_size), batches)]


def programs(topology: str, devices) -> list[tuple[str, callable]]:
    """(name, build) for every program, where build() -> (jitted function, abstract args)."""
    one = devices[0]
    listed = [
        ("plain loop: train step (BN)", lambda: plain_train_step(BN, one)),
        ("plain loop: train step (no BN)", lambda: plain_train_step(dataclasses.replace(BN, batch_norm=False), one)),
        ("plain loop: evaluation, running averages", lambda: evaluation_program(BN, one, "running")),
        ("engine: interval program, 1 run", lambda: engine_interval(BN, [one])),
        ("engine: interval program, 6 stacked runs (lax)", lambda: engine_interval(BN, [one], 6, "lax")),
        ("engine: interval program, 6 stacked runs (matmul)", lambda: engine_interval(BN, [one], 6, "matmul")),
        ("evaluation: precise BN statistics", lambda: evaluation_program(BN, one, "precise")),
        ("evaluation: batch statistics", lambda: evaluation_program(BN, one, "batch")),
        ("ghost BN (ghost batches of 8)", lambda: plain_train_step(dataclasses.replace(BN, bn=keras_bn(ghost_batch_size=8)), one)),
        ("Batch Renorm", lambda: plain_train_step(dataclasses.replace(BN, bn=keras_bn(renorm=Renorm())), one)),
        (f"BN-LSTM ({LSTM.sequence}: {sequence_length(LSTM.sequence)} time steps)",
         lambda: plain_train_step(LSTM, one)),
        ("bfloat16 (compute_dtype)", lambda: plain_train_step(dataclasses.replace(BN, compute_dtype="bfloat16"), one)),
    ]
    if len(devices) > 1:
        listed.append((f"one run split over {len(devices)} devices, synchronized BN",
                       lambda: engine_interval(BN, devices)))
    return listed


# ---------------------------------------------------------------- compile and price

def compile_for_tpu(function, args, platform: str = "tpu"):
    """`function` (jitted) compiled for the `platform` devices its abstract `args` are placed on."""
    with matmul_precision(BN):
        return function.trace(*args).lower(lowering_platforms=(platform,)).compile()


def cost_of(compiled) -> dict:
    cost = compiled.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


def hbm_needed(compiled) -> int:
    """The program's peak HBM as the compiler plans it (arguments, outputs, temporaries, code)."""
    memory = compiled.memory_analysis()
    return int(getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes + memory.generated_code_size_in_bytes))


def compile_and_price(build, chip: str) -> dict:
    """Compile one program (one or more jitted parts); its memory, cost and the
    time they imply on `chip`. XLA's cost analysis counts a loop's body once
    (tests/test_tpu_programs.py holds it to that), so each part's FLOPs and
    bytes are scaled by its loop's trip count: per training step for a train
    step, per whole test set for an evaluation."""
    start = time.perf_counter()
    flops = bytes_accessed = 0.0
    libtpu_s: float | None = 0.0
    hbm, trips = 0, []
    try:
        for function, args, trip_count in build():
            compiled = compile_for_tpu(function, args)
            cost = cost_of(compiled)
            flops += trip_count * float(cost.get("flops", 0.0))
            bytes_accessed += trip_count * float(cost.get("bytes accessed", 0.0))
            optimal = float(cost.get("optimal_seconds", -1.0))
            # libtpu's own estimate; negative (no estimate) for some larger programs
            libtpu_s = None if libtpu_s is None or optimal < 0 else libtpu_s + trip_count * optimal
            hbm = max(hbm, hbm_needed(compiled))
            trips.append(trip_count)
    except Exception as error:  # noqa: BLE001 - the compiler's error is the result
        return {"compiled": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    spec = CHIPS[chip]
    compute_s, memory_s = flops / spec["peak_flops"], bytes_accessed / spec["hbm_bytes_per_s"]
    return {
        "compiled": True, "compile_s": round(time.perf_counter() - start, 1),
        "hbm_bytes": hbm, "hbm_fraction": hbm / spec["hbm_bytes"],
        "flops": flops, "bytes_accessed": bytes_accessed, "loop_trips": trips,
        "projected_s": max(compute_s, memory_s), "bound": "memory" if memory_s >= compute_s else "compute",
        "libtpu_optimal_s": libtpu_s,
    }


def choose_strategy(device, chip: str, stacks=STACKS, chunks=EVAL_CHUNKS, log=print) -> dict:
    """Runs per program, convolution and evaluation chunk for a TPU, from the
    compiled cost of the article's BN step and evaluation on `device`."""
    per_run_step = {}
    for conv in ("lax", "matmul"):
        for runs in stacks:
            if runs == 1 and conv == "matmul":
                continue  # a program of one run always uses lax
            priced = compile_and_price(lambda: engine_interval(BN, [device], runs, conv), chip)
            if priced["compiled"]:
                priced["projected_s_per_run_step"] = priced["projected_s"] / runs
            per_run_step[f"{conv} x{runs}"] = priced
            log(f"  strategy: {conv} x{runs}: {describe(priced)}")
    evaluations = {}
    for chunk in chunks:
        evaluations[str(chunk)] = compile_and_price(lambda: evaluation_program(BN, device, "running", chunk=chunk),
                                                    chip)
        log(f"  strategy: evaluation in pieces of {chunk or 'the whole batch'}: {describe(evaluations[str(chunk)])}")
    compiled = {key: value for key, value in per_run_step.items() if value["compiled"]}
    best = min(value["projected_s_per_run_step"] for value in compiled.values())
    good = [key for key, value in compiled.items() if value["projected_s_per_run_step"] <= best * (1 + WITHIN_BEST)]
    chosen = min(good, key=lambda key: (int(key.rsplit(" x", 1)[1]), key))
    eval_chunk = min((key for key in evaluations if evaluations[key]["compiled"]),
                     key=lambda key: evaluations[key]["projected_s"])
    conv, runs = chosen.rsplit(" x", 1)
    return {"stacked_conv": "lax" if runs == "1" else conv, "models_per_program": int(runs),
            "eval_chunk": None if eval_chunk == "None" else int(eval_chunk),
            "rule": f"fewest runs per program within {WITHIN_BEST:.0%} of the best projected time per run-step; "
                    "the evaluation chunk of least projected time",
            "per_run_step": per_run_step, "evaluations": evaluations}


def describe(priced: dict) -> str:
    if not priced["compiled"]:
        return f"did not compile: {priced['error']}"
    return (f"{priced['flops'] / 1e9:.3f} GFLOP, {priced['bytes_accessed'] / 1e6:.1f} MB, HBM "
            f"{priced['hbm_bytes'] / 1e6:.1f} MB, projected {priced['projected_s'] * 1e3:.3f} ms "
            f"({priced['bound']}-bound), compiled in {priced['compile_s']} s")


# ---------------------------------------------------------------- the article's sweep

def sweep_projection(devices, chip: str, strategy, log=print) -> dict:
    """The article's sweep (experiments.article's 18 runs) as `train_many`
    launches it with `strategy`: its programs (runs grouped by program key,
    up to models_per_program each), each priced per step and per evaluation
    on one device, spread over the devices as `train_many` spreads runs
    (longest first onto the least loaded device)."""
    from experiments.article import sweep_configs

    configs = sweep_configs("article", seeds=3, epochs=3, max_steps=None)
    groups, _ = launch._group_runs(configs, strategy.models_per_program)  # as train_many groups them
    device = devices[0]
    priced_programs, priced = [], {}  # programs of one key and size compile to one program: priced once
    for group in groups:
        config, runs = configs[group[0]], len(group)
        steps_per_epoch, total_steps = resolve_steps(config, TRAIN_SIZE)
        evaluations = len(list(loop._evaluation_steps(0, total_steps, config.eval_every)))
        conv = strategy.stacked_conv
        key = (loop.program_key(config), runs)
        if key not in priced:
            priced[key] = [compile_and_price(lambda: engine_interval(config, [device], runs, conv), chip),
                           compile_and_price(lambda: evaluation_program(config, device, "running", runs, conv,
                                                                        strategy.eval_chunk), chip)]
            if config.eval_statistics == "precise":
                priced[key].append(compile_and_price(lambda: evaluation_program(
                    config, device, "precise", runs, conv, strategy.eval_chunk), chip))
        parts = priced[key]
        step, running, precise = parts[0], parts[1], parts[2] if len(parts) > 2 else None
        if not all(part["compiled"] for part in parts):
            return {"error": next(part["error"] for part in parts if not part["compiled"])}
        seconds = total_steps * step["projected_s"] + evaluations * sum(part["projected_s"] for part in parts[1:])
        name = f"{'BN' if config.batch_norm else 'plain'} {config.activation}, {runs} run{'s' if runs > 1 else ''}"
        if not any(program["program"] == name for program in priced_programs):
            log(f"  sweep: {name}: {total_steps} steps x {step['projected_s'] * 1e3:.3f} ms + {evaluations} "
                f"evaluations: {seconds:.1f} s per program")
        priced_programs.append({"program": name, "runs": runs, "steps": total_steps, "evaluations": evaluations,
                                "step_projected_s": step["projected_s"],
                                "evaluation_projected_s": running["projected_s"],
                                "precise_evaluation_projected_s": precise and precise["projected_s"],
                                "projected_s": seconds})
    loads = [0.0] * len(devices)
    for program in sorted(priced_programs, key=lambda program: -program["projected_s"]):
        loads[loads.index(min(loads))] += program["projected_s"]
    return {"runs": len(configs), "programs": priced_programs, "devices": len(devices),
            "projected_s": max(loads), "strategy": dataclasses.asdict(strategy)}


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    from bnjax.support.checks import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m benchmarks.tpu_programs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES),
                        metavar="TOPOLOGY", help=f"of {', '.join(TOPOLOGIES)} (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--no-strategy", action="store_true", help="skip pricing the strategy's candidates")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        sys.exit('error: libtpu is not installed: pip install "jax[tpu]==' + jax.__version__ + '" (it compiles for '
                 "TPU topologies on this CPU; no TPU needed)")
    from importlib import metadata

    started = time.perf_counter()
    result = {"environment": {**environment(), "libtpu": metadata.version("libtpu")},
              "chips": CHIPS, "chips_source": CHIPS_SOURCE,
              "note": "compiled for TPU topologies on a CPU host (deviceless AOT); every seconds figure is a "
                      "projection from XLA's cost analysis and published peaks, a lower bound, not a measurement",
              "topologies": {}}
    for name in args.topologies:
        devices = topology_devices(name)
        chip = TOPOLOGIES[name][2]
        hosts = len({device.process_index for device in devices})
        print(f"{name}: {len(devices)} devices ({devices[0].device_kind}), {len(devices) // hosts} per host", flush=True)
        entry = {"devices": len(devices), "device_kind": devices[0].device_kind, "hosts": hosts, "programs": {}}
        for program, build in programs(name, devices):
            entry["programs"][program] = compile_and_price(build, chip)
            print(f"  {program}: {describe(entry['programs'][program])}", flush=True)
        if name != "v5e-16":  # a sweep on a pod slice spreads over its hosts' processes: not projected here
            if not args.no_strategy and name == "v5e-1":
                entry["strategy_choice"] = choose_strategy(devices[0], chip)
                # The figure to beat: the sweep as the TPU default before this choice launched it.
                entry["article_sweep_stacked_64_matmul"] = sweep_projection(devices, chip, STACKED_64_MATMUL)
                print(f"  the article's sweep with 64 stacked runs per program (matmul): projected "
                      f"{entry['article_sweep_stacked_64_matmul'].get('projected_s', float('nan')):.0f} s", flush=True)
            entry["article_sweep"] = sweep_projection(devices, chip, default_strategy("tpu"))
            print(f"  the article's sweep with default_strategy('tpu'): projected "
                  f"{entry['article_sweep'].get('projected_s', float('nan')):.0f} s", flush=True)
        result["topologies"][name] = entry
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, result)
    print(markdown_table(result))
    print(f"wrote {args.out} ({result['seconds']} s)")


def markdown_table(result: dict) -> str:
    """The programs of every topology as a markdown table (docs/performance.md shows it)."""
    lines = ["| topology | program | compiled | HBM needed (of the device's) | GFLOP | MB accessed | "
             "projected ms | libtpu's estimate, ms |", "|---|---|---|---|---|---|---|---|"]
    for topology, entry in result["topologies"].items():
        for program, priced in entry["programs"].items():
            if not priced["compiled"]:
                lines.append(f"| {topology} | {program} | no: {priced['error']} | | | | | |")
                continue
            libtpu = "—" if priced["libtpu_optimal_s"] is None else f"{priced['libtpu_optimal_s'] * 1e3:.3f}"
            lines.append(f"| {topology} | {program} | yes | {priced['hbm_bytes'] / 1e6:.0f} MB "
                         f"({priced['hbm_fraction']:.1%}) | {priced['flops'] / 1e9:.3f} | "
                         f"{priced['bytes_accessed'] / 1e6:.0f} | {priced['projected_s'] * 1e3:.3f} | {libtpu} |")
    sweeps = [f"{topology}: {entry['article_sweep']['projected_s']:.0f} s" for topology, entry in
              result["topologies"].items() if "projected_s" in entry.get("article_sweep", {})]
    before = [f"{topology}: {entry['article_sweep_stacked_64_matmul']['projected_s']:.0f} s" for topology, entry in
              result["topologies"].items() if "projected_s" in entry.get("article_sweep_stacked_64_matmul", {})]
    return "\n".join(lines + ["", "The article's sweep with default_strategy('tpu'), projected: " + "; ".join(sweeps),
                              "with 64 stacked runs per program (matmul), projected: " + "; ".join(before)])


if __name__ == "__main__":
    main()
