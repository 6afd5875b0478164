"""bnjax's programs compiled for Colab's TPUs on this CPU (libtpu, no TPU):
the main programs compile for v5e-1 and v2-8 and fit their HBM, XLA's cost
analysis is read as benchmarks/tpu_programs.py assumes, and the engine's TPU
strategy is the cheapest the compiler reports.

These need libtpu (`pip install "jax[tpu]==<jax's version>"`, ~700 MB) and
take minutes, so they are marked `tpu`: the default pass skips them where
libtpu is missing, and CI's TPU pass installs it and runs `-m tpu` with
BNJAX_REQUIRE_TPU_COMPILER=1, which turns a missing compiler into a failure.
"""

import os

import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.tpu

try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False

if not HAVE_LIBTPU:
    if os.environ.get("BNJAX_REQUIRE_TPU_COMPILER") == "1":
        raise RuntimeError("BNJAX_REQUIRE_TPU_COMPILER=1 but libtpu is not installed: "
                           f'pip install "jax[tpu]=={jax.__version__}"')
    pytest.skip(f'libtpu is not installed (pip install "jax[tpu]=={jax.__version__}"): no TPU compiler here',
                allow_module_level=True)

from benchmarks import tpu_programs  # noqa: E402
from bnjax.engine.strategy import default_strategy  # noqa: E402


@pytest.fixture(scope="module")
def v5e():
    return tpu_programs.topology_devices("v5e-1")


@pytest.fixture(scope="module")
def v2_8():
    return tpu_programs.topology_devices("v2-8")


def test_the_chip_table_is_jaxs():
    from jax.experimental.pallas import tpu as pltpu

    if not hasattr(pltpu, "get_tpu_info_for_chip"):
        pytest.skip(f"jax {jax.__version__} has no TPU hardware table")
    for chip, spec in tpu_programs.CHIPS.items():
        info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(chip), 1)
        assert (spec["hbm_bytes"], spec["hbm_bytes_per_s"], spec["peak_flops"]) == (
            info.hbm_capacity_bytes, info.mem_bw_bytes_per_second, info.bf16_ops_per_second), chip


def test_xla_counts_a_loop_body_once(v5e):
    # What the benchmark scales by each loop's trip count: a loop of 10
    # matrix products costs, to the cost analysis, what one costs.
    sharding = jax.sharding.SingleDeviceSharding(v5e[0])
    matrix = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=sharding)

    def products(count):
        return jax.jit(lambda a: jax.lax.fori_loop(0, count, lambda _, x: x @ a, a))

    once, ten = (tpu_programs.cost_of(tpu_programs.compile_for_tpu(products(n), (matrix,)))["flops"] for n in (1, 10))
    assert once == pytest.approx(2 * 256**3, rel=0.01)
    assert ten == pytest.approx(once, rel=0.01)


def test_the_train_step_and_evaluation_compile_for_v5e_and_fit(v5e):
    step = tpu_programs.compile_and_price(lambda: tpu_programs.plain_train_step(tpu_programs.BN, v5e[0]), "v5e")
    assert step["compiled"] and step["hbm_fraction"] < 0.1
    # The article's CNN at batch 32, forward and backward: ~0.55 GFLOP (the CPU's count too: test_benchmarks.py).
    assert 0.5e9 < step["flops"] < 0.6e9 and step["bound"] == "memory"
    interval = tpu_programs.compile_and_price(lambda: tpu_programs.engine_interval(tpu_programs.BN, v5e), "v5e")
    assert interval["compiled"] and interval["flops"] == pytest.approx(step["flops"], rel=0.02)
    test_set = tpu_programs.compile_and_price(lambda: tpu_programs.evaluation_program(tpu_programs.BN, v5e[0],
                                                                                      "running"), "v5e")
    # 10,000 images forward: ~56 GFLOP once the scan's 10 batches are counted.
    assert test_set["compiled"] and 50e9 < test_set["flops"] < 62e9 and test_set["loop_trips"] == [10]


def test_a_run_split_over_v2_8s_cores_with_synchronized_bn_compiles(v2_8):
    assert len(v2_8) == 8
    split = tpu_programs.compile_and_price(lambda: tpu_programs.engine_interval(tpu_programs.BN, v2_8), "v2")
    assert split["compiled"] and split["hbm_fraction"] < 0.1
    # Each core computes its 4 of the 32 images: about an eighth of one run's step, plus the all-reduces.
    assert 0.05e9 < split["flops"] < 0.15e9


def test_the_tpu_strategy_is_the_cheapest_the_compiler_reports(v5e):
    # default_strategy("tpu") was chosen by `choose_strategy` on v5e-1: the
    # fewest runs per program within 5% of the best projected time per
    # run-step. Priced again here at its neighbours.
    strategy = default_strategy("tpu")
    chosen = strategy.models_per_program
    candidates = {(chosen, strategy.stacked_conv)}
    candidates |= {(runs, conv) for runs in (chosen // 2, chosen * 2) if runs >= 1 for conv in ("lax", "matmul")
                   if runs > 1 or conv == "lax"}
    per_run_step = {}
    for runs, conv in sorted(candidates):
        priced = tpu_programs.compile_and_price(
            lambda: tpu_programs.engine_interval(tpu_programs.BN, v5e, runs, conv), "v5e")
        assert priced["compiled"], priced
        per_run_step[runs, conv] = priced["projected_s"] / runs
    best = min(per_run_step.values())
    assert per_run_step[chosen, strategy.stacked_conv] <= best * (1 + tpu_programs.WITHIN_BEST), per_run_step
    fewer = [cost for (runs, _), cost in per_run_step.items() if runs < chosen]
    assert all(cost > best * (1 + tpu_programs.WITHIN_BEST) for cost in fewer), per_run_step

