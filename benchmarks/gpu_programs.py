"""bnjax's main programs compiled for an NVIDIA H100 and A100 on this CPU,
without the GPU: JAX's CUDA plugin (`pip install "jax[cuda12]==<the
installed jax>"`) compiles for a GPU described by its target description
(benchmarks/gpu_targets.py) when JAX runs on the CPU ("deviceless AOT",
openxla/xla#16913).

    python -m benchmarks.gpu_programs     # -> outputs/benchmarks/gpu_programs.json, a table on stdout

For each GPU and program (the plain loop's train step and evaluation, the
engine's interval program for one run and for the GPU strategy's stacked
runs) it records whether it compiled (or the compiler's error), the memory
the compiled program plans (`memory_analysis`: arguments, outputs,
temporaries) against the GPU's 80 GB, and its kernels (fusions and library
calls in the optimized HLO: what a step launches). XLA gives no cost
analysis for a program compiled without its GPU (`cost_analysis()` is None),
so no time is projected here; the GPU's times are measured ones
(`python -m benchmarks.accelerator_sweep` on a lent GPU, docs/performance.md).
Without the GPU, XLA cannot autotune (convolution algorithms, GEMM tilings):
the program compiled here is not necessarily the one a GPU would run.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the GPUs are described, never present

import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from benchmarks import tpu_programs  # noqa: E402
from benchmarks.gpu_targets import GPU_TARGETS  # noqa: E402
from bnjax.engine.strategy import default_strategy  # noqa: E402
from bnjax.support.atomic import write_json  # noqa: E402
from bnjax.support.provenance import environment  # noqa: E402

DEFAULT_OUT = Path("outputs/benchmarks/gpu_programs.json")
GPU_MEMORY_BYTES = 80e9


def gpu_device(name: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGETS[name],
                                        topology="1x1x1").devices[0]


def programs(device) -> list[tuple[str, callable]]:
    strategy = default_strategy("gpu")
    bn = tpu_programs.BN
    return [
        ("plain loop: train step (BN)", lambda: tpu_programs.plain_train_step(bn, device)),
        ("plain loop: evaluation, running averages", lambda: tpu_programs.evaluation_program(bn, device, "running")),
        ("engine: interval program, 1 run", lambda: tpu_programs.engine_interval(bn, [device])),
        (f"engine: interval program, {strategy.models_per_program} stacked runs ({strategy.stacked_conv})",
         lambda: tpu_programs.engine_interval(bn, [device], strategy.models_per_program, strategy.stacked_conv)),
    ]


def compile_and_describe(build) -> dict:
    start = time.perf_counter()
    try:
        (function, args, _), = build()
        compiled = tpu_programs.compile_for_tpu(function, args, platform="cuda")
    except Exception as error:  # noqa: BLE001 - the compiler's error is the result
        return {"compiled": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    memory = compiled.memory_analysis()
    planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)
    text = compiled.as_text()
    return {"compiled": True, "compile_s": round(time.perf_counter() - start, 1),
            "memory_bytes": planned, "memory_fraction": planned / GPU_MEMORY_BYTES,
            "temp_bytes": memory.temp_size_in_bytes,
            "fusions": len(re.findall(r"= [^=]*\bfusion\(", text)),
            "library_calls": len(re.findall(r"custom-call\(", text)),
            "cost_analysis": compiled.cost_analysis()}


def main(argv=None) -> None:
    from bnjax.support.checks import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m benchmarks.gpu_programs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        sys.exit(f'error: JAX\'s CUDA plugin is not installed: pip install "jax[cuda12]=={jax.__version__}" '
                 "(it compiles for a described GPU on this CPU; no GPU needed)")
    result = {"environment": environment(), "gpus": {},
              "note": "compiled for described GPUs on a CPU host (deviceless AOT): no cost analysis, no autotuning"}
    for name in GPU_TARGETS:
        device = gpu_device(name)
        result["gpus"][name] = {}
        for program, build in programs(device):
            described = compile_and_describe(build)
            result["gpus"][name][program] = described
            if described["compiled"]:
                print(f"{name}: {program}: compiled in {described['compile_s']} s, memory "
                      f"{described['memory_bytes'] / 1e6:.1f} MB, {described['fusions']} fusions, "
                      f"{described['library_calls']} library calls, cost analysis: {described['cost_analysis']}",
                      flush=True)
            else:
                print(f"{name}: {program}: did not compile: {described['error']}", flush=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
