"""The article sweep on an accelerator: bnjax cold and warm, beside PyTorch
on the same workload, in one run.

    python -m benchmarks.accelerator_sweep        # 30 runs x 3 epochs -> outputs/benchmarks/accelerator_sweep.json
    python -m benchmarks.accelerator_sweep --seeds 1 --max-steps 200 --peers none --out /tmp/smoke.json

The workload, the same for every contender: the article grid (3 settings of
learning rate and activation, plain and BN) x `--seeds` seeds, `--epochs`
epochs of 1875 steps at batch 32 with Adam (or `--max-steps`), the 10,000 test
images evaluated every `--eval-every` steps and at the end, and on every BN
run, at every evaluation, again with precise BN statistics from 200 training
batches.

Each contender runs in a process of its own, started from this one:
  bnjax cold  `train_many(configs, data)` with the default strategy and an
              empty persistent compilation cache (compiling included);
  bnjax warm  the same again in a new process, the cache filled by the cold run;
  bnjax VARIANT  cold and warm again with another arithmetic (`--variants`):
              "bfloat16" (TrainConfig(compute_dtype="bfloat16")) and
              "highest" (TrainConfig(matmul_precision="highest"), float32 products);
  stacking    R = 1, 2, 4, 8, 16 BN runs of one program (sigmoid, lr 0.01):
              steady-state run-steps/s, from the difference between runs of
              `STACKING_STEPS` steps (one evaluation, at the end, in both);
  pytorch-*   benchmarks/torch_sweep.py: eager, cudagraphs, vmap.
Timed: from the configs to the last History (the data set is read from disk
before the clock starts; moving it to the device is timed). A PyTorch way
trains `--peer-fraction` of every run's steps and evaluations; its `seconds`
are its one-time compilation plus the rest scaled up by 1 / fraction, and
`extrapolated` says so. The JSON file is written atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.sweep import positive_int

DEFAULT_OUT = Path("outputs/benchmarks/accelerator_sweep.json")
PEERS = ("eager", "cudagraphs", "vmap")
# The sweep again with another arithmetic: the TrainConfig fields each variant sets.
VARIANTS = {"bfloat16": {"compute_dtype": "bfloat16"}, "highest": {"matmul_precision": "highest"}}


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def names_of(allowed, kind: str):
    """An argparse type: a comma-separated list of names from `allowed`, or "none"."""
    def parse(text: str) -> list[str]:
        if text == "none":
            return []
        names = text.split(",")
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {unknown[0]!r}; allowed: {', '.join(allowed)}, or none")
        return names
    return parse


peer_list, variant_list = names_of(PEERS, "peer"), names_of(VARIANTS, "variant")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accelerator_sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=positive_int, default=5, help="seeds per setting (6 settings; default 5: 30 runs)")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop every run here (a smoke size)")
    parser.add_argument("--eval-every", type=positive_int, default=100)
    parser.add_argument("--peers", type=peer_list, default=list(PEERS),
                        help=f"comma-separated PyTorch ways ({','.join(PEERS)}) or none (default: all)")
    parser.add_argument("--peer-fraction", type=fraction, default=0.2,
                        help="share of every run's steps a PyTorch way trains; its time is scaled up (default 0.2)")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help=f"the sweep again in other arithmetic: {', '.join(VARIANTS)} (comma-separated) or none")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the processes this one starts
    parser.add_argument("--no-stacking", action="store_true", help="leave out the stacked-runs scaling measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--contender", help=argparse.SUPPRESS)  # set in the processes this one starts
    args = parser.parse_args(argv)
    if args.out.exists() and args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; give a file path")
    if not args.out.parent.is_dir() and args.out.parent != Path(""):
        parser.error(f"--out {args.out}: its folder {args.out.parent} does not exist")
    return args


def workload(args) -> dict:
    return {"runs": 6 * args.seeds, "epochs": args.epochs, "max_steps": args.max_steps,
            "eval_every": args.eval_every, "precise_bn": True}


def sweep_configs(args):
    import dataclasses

    from experiments.article import sweep_configs as article_configs

    configs = article_configs("article", seeds=args.seeds, epochs=args.epochs, max_steps=args.max_steps)
    arithmetic = VARIANTS[args.variant] if args.variant else {}
    return [dataclasses.replace(config, eval_every=args.eval_every, **arithmetic) for config in configs]


# ---------------------------------------------------------------- in the contenders' processes

def bnjax_contender(args) -> dict:
    import jax

    from bnjax.data.datasets import load_mnist
    from bnjax.engine.launch import train_many
    from bnjax.support.provenance import environment
    from bnjax.training.schedule import resolve_steps

    compile_seconds = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compile_seconds.append(seconds) if event in COMPILE_EVENTS else None)
    data = load_mnist()
    configs = sweep_configs(args)
    start = time.perf_counter()
    results = train_many(configs, data)
    seconds = time.perf_counter() - start
    run_steps = sum(resolve_steps(config, len(data.x_train))[1] for config in configs)
    device = jax.devices()[0]
    return {"seconds": seconds, "compile_seconds": sum(compile_seconds), "run_steps": run_steps,
            "device": f"{device.device_kind} ({device.platform})", "num_devices": jax.device_count(),
            "mean_final_val_accuracy": sum(h.val_accuracy[-1] for h, _ in results) / len(results),
            "precision": results[0][0].precision, "environment": environment()}


STACKING_RUNS = (1, 2, 4, 8, 16)
STACKING_STEPS = (500, 5500)  # within one run of the default 3 epochs (5625 steps)


def stacking_contender(args) -> dict:
    """Run-steps/s of R stacked BN runs in steady state, for each R."""
    import dataclasses

    from bnjax.data.datasets import load_mnist
    from bnjax.engine.strategy import default_strategy
    from bnjax.engine.launch import train_many
    from bnjax.training.config import TrainConfig

    data = load_mnist()
    # All R runs in one program, in this process (the CPU's default would train them side by side in workers).
    stacked = dataclasses.replace(default_strategy(), models_per_program=max(STACKING_RUNS), parallel_runs=1)
    rates = {}
    for num_runs in STACKING_RUNS:
        seconds = []
        for steps in (STACKING_STEPS[0], *STACKING_STEPS):  # the first call compiles; not counted
            configs = [TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=0.01, max_steps=steps,
                                   eval_every=steps, seed=seed) for seed in range(num_runs)]
            start = time.perf_counter()
            train_many(configs, data, strategy=stacked)
            seconds.append(time.perf_counter() - start)
        rates[num_runs] = num_runs * (STACKING_STEPS[1] - STACKING_STEPS[0]) / (seconds[2] - seconds[1])
    return {"run_steps_per_s": rates,
            "per_run_share": {r: rates[r] / (r * rates[1]) for r in STACKING_RUNS}}


# Tracing, lowering and XLA compilation (a persistent-cache hit reports its load here).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def torch_contender(args, way: str) -> dict:
    from benchmarks.torch_sweep import run_workload
    from bnjax.data.datasets import load_mnist
    from bnjax.training.schedule import resolve_steps

    data = load_mnist()
    configs = sweep_configs(args)
    runs = [(c.batch_norm, c.activation, c.learning_rate, c.seed) for c in configs]
    total_steps = resolve_steps(configs[0], len(data.x_train))[1]
    return run_workload(way, data, runs, total_steps, args.eval_every, args.peer_fraction)


# ---------------------------------------------------------------- the run

def run_contender(argv, contender: str, env: dict) -> dict:
    """One contender in its own process; its one JSON line back, or why not."""
    command = [sys.executable, "-m", "benchmarks.accelerator_sweep", *argv, "--contender", contender]
    print(f"accelerator_sweep: {contender} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"accelerator_sweep: {contender} failed: {reason}", file=sys.stderr, flush=True)
        return {"error": reason}
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    shown = {key: value for key, value in outcome.items() if key != "environment"}
    print(f"accelerator_sweep: {contender}: {json.dumps(shown)}", file=sys.stderr, flush=True)
    return outcome


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.contender == "bnjax":
        print(json.dumps(bnjax_contender(args)))
        return
    if args.contender == "stacking":
        print(json.dumps(stacking_contender(args)))
        return
    if args.contender:
        print(json.dumps(torch_contender(args, args.contender)))
        return

    # This process never initializes a JAX backend: on a GPU it would hold
    # the memory the contenders' processes need.
    from bnjax.support.atomic import write_json
    from benchmarks.peers import available

    passed_on = [a for a in argv if not a.startswith("--contender")]
    with tempfile.TemporaryDirectory(prefix="bnjax-accelerator-sweep-cache-") as cache:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        cold = run_contender(passed_on, "bnjax", env)
        warm = run_contender(passed_on, "bnjax", env)
        variants = {variant: [run_contender([*passed_on, "--variant", variant], "bnjax", env) for _ in ("cold", "warm")]
                    for variant in args.variants}
        stacking = None if args.no_stacking else run_contender(passed_on, "stacking", env)
    peers = {}
    missing = available()["pytorch"]
    for way in args.peers:
        name = f"pytorch-{way}"
        if missing:
            peers[name] = {"seconds": None, "extrapolated": False, "skipped": missing}
            continue
        outcome = run_contender(passed_on, way, dict(os.environ))
        if "error" in outcome:
            peers[name] = {"seconds": None, "extrapolated": False, "error": outcome["error"]}
            continue
        seconds = outcome["setup_seconds"] + outcome["measured_seconds"] / outcome["fraction"]
        peers[name] = {"seconds": seconds, "extrapolated": outcome["fraction"] < 1, **outcome}
    env_facts = cold.get("environment") or warm.get("environment") or {}
    result = {
        "device": cold.get("device"), "bnjax_commit": env_facts.get("bnjax_commit"),
        "jax": env_facts.get("jax"), "workload": workload(args),
        "bnjax": {"seconds_cold": cold.get("seconds"), "seconds_warm": warm.get("seconds"),
                  "compile_seconds": cold.get("compile_seconds"),
                  "compile_seconds_warm": warm.get("compile_seconds"),
                  "run_steps_per_s": (warm["run_steps"] / warm["seconds"]) if "seconds" in warm else None,
                  "mean_final_val_accuracy": warm.get("mean_final_val_accuracy"), "precision": warm.get("precision"),
                  **({"error": cold.get("error") or warm.get("error")} if "error" in cold or "error" in warm else {})},
        "variants": {variant: {"seconds_cold": cold_run.get("seconds"), "seconds_warm": warm_run.get("seconds"),
                               "mean_final_val_accuracy": warm_run.get("mean_final_val_accuracy"),
                               "precision": warm_run.get("precision"),
                               **({"error": cold_run.get("error") or warm_run.get("error")}
                                  if "error" in cold_run or "error" in warm_run else {})}
                     for variant, (cold_run, warm_run) in variants.items()},
        "stacking": stacking,
        "peers": peers,
        "command": "python -m benchmarks.accelerator_sweep " + " ".join(passed_on),
        "environment": env_facts,
    }
    write_json(args.out, result)
    print(f"accelerator_sweep: wrote {args.out}", file=sys.stderr)
    fastest_peer = min((p["seconds"] for p in peers.values() if p.get("seconds")), default=None)
    print(f"bnjax: {result['bnjax']['seconds_cold']} s cold, {result['bnjax']['seconds_warm']} s warm; "
          f"fastest PyTorch way: {fastest_peer} s")


if __name__ == "__main__":
    main()
