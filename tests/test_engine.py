"""The plain loop (`bnjax.train`, bnjax/training/train.py) defines what
training computes; every launch strategy of the engine gives its History
(same config, same seed): bit for bit where the compiled computation is the
same, else within the float round-off stated per test."""

import collections
import dataclasses
import logging
import os
import re

import jax
import numpy as np
import pytest

from bnjax.engine import launch as engine
from bnjax.engine.launch import train_many
from bnjax.engine.loop import program_key
from bnjax.engine.strategy import Strategy, default_strategy
from bnjax.nets.recurrent import paper_settings
from bnjax.support import host, xla_flags
from bnjax.training.config import TrainConfig
from bnjax.training.schedule import resolve_steps
from bnjax.training.steps import model_of
from bnjax.training.train import train
from conftest import observer

# A different but equivalent compilation (a loop body, a vmapped convolution)
# changes float32 round-off only. How far round-off then travels depends on
# the run, not on the strategy: switching XLA:CPU's convolution kernels alone
# (bnjax/support/xla_flags.py on vs. off, both one step per dispatch) moved the BN
# relu net's test loss by 5e-2 after 60 steps at Adam lr 0.01 on MNIST, while
# the plain sigmoid net stayed within 2e-6. So strategies are compared where
# round-off stays round-off: Adam at lr 0.001 on the synthetic set, 20 steps
# with sigmoid, 6 with relu (whose kinks and max-pool near-ties flip on round-
# off sooner). Adam's first steps move a weight whose gradient is ~0 by up to
# a learning rate on a round-off sign change, so parameters must agree to
# 1e-5 in 90% of entries and to one step (1e-3) in all. Seen from round-off
# alone: up to 1.9% of the entries beyond 1e-5 in a vmapped program (max
# 1.8e-4, AMD EPYC VM), above 3% (max 7.8e-4) in one clean-clone CI run, 6.3%
# in a worker process on one core (max 8e-4). Seen from real errors, against
# the per-step sigmoid run: learning rate 1% off leaves 10.5% of the entries
# within 1e-5 (max 3.6e-3), one step fewer 4.4%, another batch order 0.2%.
# Losses agree to 1e-5 plus 5e-5 relative (seen on the AMD VM: a worker's
# training loss 2.3e-5 relative off); a wrong batch, step count or learning
# rate moves them by ~1e-2. (Where XLA:CPU's results could depend on the
# machine's load: they do not. Four runs of this file's vmapped programs,
# two on an idle machine and two beside four busy processes, gave bit-identical
# parameters; XLA:CPU splits its work by the threads the process has,
# fixed when it starts, not by how busy they are.)
CURVE_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 5e-5
PARAM_TOLERANCE = 1e-5
PARAM_SHARE_WITHIN = 0.9
ONE_ADAM_STEP = 1e-3
# Accuracies count examples, and an example whose two top logits lie within
# round-off of each other may change its argmax. Measured: at most one of the
# 64 test images (or of the 64-192 training images between evaluations) on
# AVX-512, AVX2 and SSE 4.2 code paths; three are allowed, so that flips in
# another CPU's order do not fail a test. A wrong evaluation (another batch,
# statistics one step behind) moves the losses beside them by ~1e-2.
ACCURACY_FLIPS = 3


def assert_same_run(a, b, tolerance=CURVE_TOLERANCE):
    (history_a, state_a), (history_b, state_b) = a, b
    assert history_a.steps == history_b.steps
    assert history_a.diverged == history_b.diverged
    for key in ("val_loss", "train_loss"):
        np.testing.assert_allclose(getattr(history_a, key), getattr(history_b, key), atol=tolerance,
                                   rtol=RELATIVE_TOLERANCE, err_msg=key)
    for key in ("val_accuracy", "train_accuracy"):
        np.testing.assert_allclose(getattr(history_a, key), getattr(history_b, key),
                                   atol=ACCURACY_FLIPS / 64 + 1e-9, err_msg=key)
    for tree in ("params", "batch_stats"):
        leaves_a = jax.tree_util.tree_leaves(getattr(state_a, tree))
        leaves_b = jax.tree_util.tree_leaves(getattr(state_b, tree))
        assert len(leaves_a) == len(leaves_b)
        if not leaves_a:  # the plain net has no batch_stats
            continue
        differences = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                                      for a, b in zip(leaves_a, leaves_b)])
        assert np.mean(differences <= PARAM_TOLERANCE) >= PARAM_SHARE_WITHIN, (tree, np.sort(differences)[-20:])
        assert differences.max() <= ONE_ADAM_STEP, (tree, differences.max())


# 8 steps per epoch on the 256-image synthetic set: 20 steps cross two epoch
# boundaries, with evaluations every 6 steps and at the end, reshuffled each epoch.
BASE = TrainConfig(batch_norm=True, activation="sigmoid", epochs=3, max_steps=20, eval_every=6, shuffle=True,
                   eval_batch_size=32)
RELU = dataclasses.replace(BASE, activation="relu", max_steps=6, eval_every=4)
PER_STEP = Strategy(steps_per_dispatch=1)
# How a strategy computes the CNN (a scanned or vmapped convolution, BN over
# batch and spatial axes) is tested on the CNN itself; the strategy options
# that only change how the loop is compiled (unrolled steps), the other nets'
# paths through it (relu, the plain net without batch_stats) and the loop's
# bookkeeping (worker processes, probes, checkpoints, divergence, refusals)
# train the BN paper's MLP: the same loop and the same BN state in a program
# that compiles in a fraction of the CNN's time (compiling the CNN's scanned
# and vmapped programs is most of this file's time: 248 s of the suite's
# slowest-file list before these cases moved to the MLP, 156-180 s after).
MLP_BASE = dataclasses.replace(BASE, model="mlp")
MLP_RELU = dataclasses.replace(RELU, model="mlp")


def test_the_engine_one_step_per_dispatch_gives_the_plain_loops_history(tiny_data):
    # A plain net: the engine's program for one run is the plain loop's step
    # with the batch gathered on the device and a runs axis of one around it;
    # XLA compiles the same arithmetic: bit for bit. With BN the running
    # averages' update is fused otherwise (1 ulp of a running mean after 3
    # steps, measured): within round-off (the slow tests below).
    config = dataclasses.replace(MLP_BASE, batch_norm=False, max_steps=10, eval_every=4)
    (engine_history, engine_state), = train_many([config], tiny_data, strategy=PER_STEP)
    plain_history, plain_state = train(config, tiny_data)
    assert plain_history.steps == [4, 8, 10]
    for curve in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
        assert getattr(engine_history, curve) == getattr(plain_history, curve), curve
    jax.tree_util.tree_map(np.testing.assert_array_equal, engine_state.params, plain_state.params)


def test_the_plain_loop_runs_on_one_device(tiny_data):
    with pytest.raises(ValueError, match=r"train runs on one device, got num_devices 2; "
                                         r"bnjax.train_many\(\[config\], data\) splits each batch over several"):
        train(dataclasses.replace(MLP_BASE, num_devices=2), tiny_data)


@pytest.mark.slow
@pytest.mark.parametrize("config, strategy", [
    (BASE, PER_STEP),
    (BASE, Strategy(steps_per_dispatch=4)),
    (BASE, Strategy(steps_per_dispatch=100)),
    (MLP_BASE, Strategy(steps_per_dispatch=4, unroll=True)),
    (MLP_RELU, Strategy(steps_per_dispatch=4)),
    (dataclasses.replace(MLP_BASE, batch_norm=False), Strategy(steps_per_dispatch=4)),
    (BASE, Strategy(steps_per_dispatch=1, eval_chunk=8)),
    (BASE, default_strategy("cpu")),
], ids=["bn-sigmoid-per-step", "bn-sigmoid-scan4", "bn-sigmoid-scan-to-eval", "mlp-bn-sigmoid-scan4-unrolled", "mlp-bn-relu-scan4",
        "mlp-plain-scan4", "bn-sigmoid-eval-in-chunks-of-8", "cpu-default"])
def test_every_launch_strategy_gives_the_plain_loops_history(tiny_data, strategy, config):
    reference = train(config, tiny_data)
    assert reference[0].steps == ([6, 12, 18, 20] if config.max_steps == 20 else [4, 6])
    assert_same_run(train_many([config], tiny_data, strategy=strategy)[0], reference)


@pytest.mark.slow
def test_vmapped_programs_give_each_runs_history(tiny_data):
    configs = [dataclasses.replace(BASE, seed=seed, learning_rate=learning_rate)
               for learning_rate in (0.001, 0.0005) for seed in (0, 1)]
    configs.append(dataclasses.replace(MLP_RELU, seed=3))  # another program (the MLP: cheaper to compile)
    # 4 BN runs -> programs of 3 and 1; test batches of 32 evaluated in pieces of 16.
    # The stacked CNNs compute their convolutions as GPUs and TPUs do by
    # default (bnjax/nets/conv.py: patches and batched matrix products); the run
    # alone and the per-step references with lax's convolution.
    strategy = Strategy(steps_per_dispatch=5, models_per_program=3, eval_chunk=16, stacked_conv="matmul")
    seen = []
    together = train_many(configs, tiny_data, strategy=strategy,
                          observer=observer(on_done=lambda c, h, s: seen.append(c)))
    assert sorted(seen, key=configs.index) == configs
    assert [model_of(state).conv_implementation for _, state in together[:4]] == ["matmul"] * 3 + ["lax"]
    for config, result in zip(configs, together):
        assert_same_run(result, train(config, tiny_data))
    assert together[0][0].val_loss != together[1][0].val_loss  # seeds differ: not one run copied


class CompileLog(logging.Handler):
    """The names of the functions JAX compiles while it is attached."""

    def __init__(self):
        super().__init__()
        self.compiled = []

    def emit(self, record):
        match = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
        if match:
            self.compiled.append(match.group(1))


@pytest.mark.slow
def test_a_sweep_compiles_one_training_program_and_one_evaluation_per_kind(tiny_data):
    # Intervals of 6, 6, 6 and 2 steps, two of them across an epoch boundary
    # (8 steps per epoch), each run evaluated with running and with precise
    # statistics: one program for all intervals, one per kind of evaluation,
    # one model initialization. (A batch size no other test uses, so that no
    # program is already in this process's memory.)
    config = dataclasses.replace(MLP_BASE, batch_size=24, eval_batch_size=24, eval_statistics="precise",
                                 precise_bn_batches=2)
    assert resolve_steps(config, len(tiny_data.x_train)) == (10, 20)
    config = dataclasses.replace(config, steps_per_epoch=8)
    configs = [dataclasses.replace(config, seed=seed) for seed in (0, 1)]
    log = CompileLog()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(log)
    try:
        with jax.log_compiles(True):
            results = train_many(configs, tiny_data, strategy=Strategy(steps_per_dispatch=6, models_per_program=2))
    finally:
        logger.removeHandler(log)
    assert results[0][0].steps == [6, 12, 18, 20]
    counts = collections.Counter(log.compiled)
    assert (counts["_chunk"], counts["_running_totals"], counts["_precise_totals"]) == (1, 1, 1), counts
    # The model's initialization (compiled once per net, here or by an earlier
    # test), stacking the runs and taking each one out: one program each.
    assert counts["_initial_variables"] <= 1 and counts["stack_runs"] == counts["run_of"] == 1, counts


@pytest.mark.slow
def test_runs_in_worker_processes_give_each_runs_history_and_state(tiny_data):
    # Two workers, one core each: a vmapped program of two runs beside a run alone.
    configs = [dataclasses.replace(MLP_BASE, seed=0), dataclasses.replace(MLP_BASE, seed=1, learning_rate=0.0005),
               dataclasses.replace(MLP_RELU, seed=4)]
    seen = []
    strategy = Strategy(parallel_runs=2, models_per_program=2, steps_per_dispatch=2, eval_chunk=16)
    in_workers = train_many(configs, tiny_data, strategy=strategy, observer=observer(
        on_eval=lambda c, step, total, record: seen.append((configs.index(c), step))))
    assert sorted(seen) == [(0, 6), (0, 12), (0, 18), (0, 20), (1, 6), (1, 12), (1, 18), (1, 20), (2, 4), (2, 6)]
    assert len(in_workers) == len(configs)
    for config, result in zip(configs, in_workers):
        assert_same_run(result, train(config, tiny_data))
        history, state = result
        # The state rebuilt from the worker's arrays is whole: step, optimizer state.
        assert int(state.step) == history.steps[-1]
        jax.tree_util.tree_map(lambda leaf: np.testing.assert_array_equal(np.isfinite(leaf), True), state.opt_state)


@pytest.mark.slow
def test_a_diverging_run_stops_its_history_where_train_stops(tiny_data):
    configs = [dataclasses.replace(MLP_BASE, batch_norm=False, activation="sigmoid", learning_rate=lr, optimizer="sgd",
                                   max_steps=18) for lr in (0.1, 1e38)]
    together = train_many(configs, tiny_data, strategy=Strategy(steps_per_dispatch=6, models_per_program=2))
    alone = [train(config, tiny_data) for config in configs]
    assert alone[1][0].diverged and alone[1][0].steps == together[1][0].steps
    assert not together[0][0].diverged and together[0][0].steps == [6, 12, 18]
    np.testing.assert_allclose(together[0][0].val_accuracy, alone[0][0].val_accuracy, atol=CURVE_TOLERANCE,
                               rtol=RELATIVE_TOLERANCE)


def test_programs_group_by_everything_but_seed_and_learning_rate():
    assert program_key(TrainConfig(seed=1, learning_rate=0.1)) == program_key(TrainConfig(seed=2))
    assert program_key(TrainConfig(batch_norm=True)) != program_key(TrainConfig())


def test_strategy_values_are_checked_and_cpu_runs_one_step_per_dispatch():
    with pytest.raises(ValueError, match="steps_per_dispatch must be a positive integer, got 0"):
        Strategy(steps_per_dispatch=0)
    with pytest.raises(ValueError, match="unroll must be True or False, got 'yes'"):
        Strategy(unroll="yes")
    with pytest.raises(ValueError, match="eval_chunk must be a positive integer or None, got 0"):
        Strategy(eval_chunk=0)
    assert default_strategy("cpu") == Strategy(1, False, 1, eval_chunk=200, parallel_runs=host.usable_core_count())
    assert default_strategy("gpu").steps_per_dispatch > 1 and default_strategy("gpu").models_per_program > 1
    assert default_strategy("gpu").stacked_conv == "matmul"
    # A TPU: whole intervals per dispatch, no CPU worker processes; runs per
    # program as the TPU compiler's costs chose (tests/test_tpu_programs.py).
    assert default_strategy("tpu").steps_per_dispatch > 1 and default_strategy("tpu").parallel_runs == 1
    with pytest.raises(ValueError, match="unknown stacked_conv 'grouped'; allowed: lax, matmul"):
        Strategy(stacked_conv="grouped")
    several_cpus = default_strategy("cpu", num_devices=8)  # simulated devices: each step awaited, one process
    assert several_cpus.await_each_dispatch and several_cpus.parallel_runs == 1
    assert not default_strategy("gpu", num_devices=8).await_each_dispatch


def test_xla_cpu_flags_are_added_once_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(xla_flags, "backend_started", lambda: False)  # as where a program starts
    monkeypatch.setattr(xla_flags.metadata, "version", lambda package: "0.7.1")  # older than the flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.use_cpu_flags() == [] and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setattr(xla_flags.metadata, "version", lambda package: "0.10.2")
    added = xla_flags.use_cpu_flags()
    assert added == list(xla_flags.CPU_FLAGS)
    assert os.environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 ")
    assert xla_flags.use_cpu_flags() == []  # already there: not twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")  # the user's own value wins
    assert xla_flags.use_cpu_flags() == []
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("BNJAX_XLA_FLAGS", "0")
    assert xla_flags.use_cpu_flags() == [] and os.environ["XLA_FLAGS"] == ""


def test_xla_cpu_flags_are_never_added_once_jax_runs_and_workers_follow_their_parent(monkeypatch):
    import jax.numpy as jnp

    jnp.ones(1).block_until_ready()  # this process's backend has started: XLA has read XLA_FLAGS
    monkeypatch.setattr(xla_flags.metadata, "version", lambda package: "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("BNJAX_XLA_FLAGS", raising=False)
    assert xla_flags.backend_started() and xla_flags.use_cpu_flags() == [] and os.environ["XLA_FLAGS"] == ""
    # A worker of a process without the flags goes without them; of one with them, inherits them.
    assert xla_flags.for_subprocess({"XLA_FLAGS": ""})["BNJAX_XLA_FLAGS"] == "0"
    with_flags = {"XLA_FLAGS": " ".join(xla_flags.CPU_FLAGS)}
    assert xla_flags.for_subprocess(with_flags) == with_flags


def test_importing_bnjax_changes_nothing_global():
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "BNJAX_XLA_FLAGS")}
    script = "import os, bnjax, bnjax.engine.launch, bnjax.__main__; print(repr(os.environ.get('XLA_FLAGS')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None"
    # Nor does training: the flags come from an explicit use_cpu_flags() where a program starts.
    script = ("import os, bnjax, numpy as np; from bnjax.data.datasets import Dataset\n"
              "rng = np.random.default_rng(0); images = rng.integers(0, 255, (64, 28, 28, 1), np.uint8)\n"
              "data = Dataset(images, np.arange(64, dtype=np.int32) % 10, images[:16], np.arange(16, dtype=np.int32) % 10)\n"
              "config = bnjax.TrainConfig(batch_norm=True, max_steps=2, eval_every=2, eval_batch_size=16)\n"
              "bnjax.train(config, data); bnjax.train_many([config], data)\n"
              "print(repr(os.environ.get('XLA_FLAGS')), bnjax.use_cpu_flags())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None []"  # and once JAX has computed, use_cpu_flags adds nothing


def running_variance_probe(config, data):
    """A `make_probe` for train_many: built where the run trains (a worker
    imports this module by name), it reads the first BN's running variance."""
    del data
    return lambda state: {"var0": float(state.batch_stats["BatchNorm_0"]["var"][0]), "seed": config.seed}


@pytest.mark.slow
def test_probes_of_stacked_and_worker_runs_are_each_runs_own(tiny_data):
    # Two workers: a vmapped program of two runs beside a run alone.
    configs = [dataclasses.replace(MLP_BASE, seed=0), dataclasses.replace(MLP_BASE, seed=1, learning_rate=0.0005),
               dataclasses.replace(MLP_RELU, seed=2)]
    strategy = Strategy(parallel_runs=2, models_per_program=2, steps_per_dispatch=3)
    results = train_many(configs, tiny_data, strategy=strategy, observer=observer(running_variance_probe))
    for config, (history, state) in zip(configs, results):
        assert [probe["seed"] for probe in history.probes] == [config.seed] * len(history.steps)
        # the last probe read the run's own final state
        assert history.probes[-1]["var0"] == float(state.batch_stats["BatchNorm_0"]["var"][0])
    assert results[0][0].probes[-1]["var0"] != results[1][0].probes[-1]["var0"]


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_a_stacked_program_resumes_from_its_checkpoints(tiny_data, tmp_path):
    configs = [dataclasses.replace(MLP_BASE, seed=seed) for seed in (0, 1)]
    strategy = Strategy(steps_per_dispatch=3, models_per_program=2)
    uninterrupted = train_many(configs, tiny_data, strategy=strategy)

    def stop_at_step_12(config, step, total, record):
        if step == 12:  # after both runs' checkpoints of step 12 were written
            raise Interrupt

    with pytest.raises(Interrupt):
        train_many(configs, tiny_data, strategy=strategy,
                   observer=observer(checkpoint_dir=tmp_path, on_eval=stop_at_step_12))
    assert len(list(tmp_path.glob("run-*"))) == 2
    resumed = train_many(configs, tiny_data, strategy=strategy, observer=observer(checkpoint_dir=tmp_path))
    for (history, state), (reference, reference_state) in zip(resumed, uninterrupted):
        for curve in ("steps", "val_loss", "val_accuracy", "train_loss", "train_accuracy"):
            assert getattr(history, curve) == getattr(reference, curve), curve
        jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, reference_state.params)


@pytest.mark.slow
def test_runs_of_different_programs_are_refused_in_one_line(tiny_data):
    from bnjax.engine.loop import train_runs

    with pytest.raises(ValueError, match="runs of one program may differ only in seed, learning_rate"):
        train_runs([MLP_BASE, MLP_RELU], tiny_data)


@pytest.mark.slow
def test_a_program_killed_between_its_runs_saves_resumes_from_the_step_all_of_them_hold(tiny_data, tmp_path):
    from bnjax.engine.loop import train_runs

    import shutil

    configs = [dataclasses.replace(MLP_BASE, max_steps=12, eval_every=3, seed=seed) for seed in (0, 1)]
    uninterrupted = train_runs(configs, tiny_data)
    paths = [tmp_path / "a.ckpt", tmp_path / "b.ckpt"]

    def stop_at_step_9(index, step, total, record):
        if step == 9 and index == 1:  # both runs saved step 9
            raise Interrupt

    with pytest.raises(Interrupt):
        train_runs(configs, tiny_data, on_eval=stop_at_step_9, checkpoint_paths=paths)
    shutil.rmtree(paths[1] / "9")  # as if killed after run a saved step 9 and before run b did
    assert [sorted(int(step.name) for step in path.iterdir()) for path in paths] == [[6, 9], [6]]
    resumed = train_runs(configs, tiny_data, checkpoint_paths=paths)
    for (history, state), (reference, reference_state) in zip(resumed, uninterrupted):
        assert history.steps == reference.steps and history.val_loss == reference.val_loss
        jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, reference_state.params)
    # Runs that share no step start afresh, to the same numbers; what is
    # there must be theirs, since it is overwritten.
    (tmp_path / "c.ckpt").mkdir()
    train_runs(configs, tiny_data, checkpoint_paths=[paths[0], tmp_path / "c.ckpt"])
    with pytest.raises(ValueError, match="is from another config"):
        train_runs([dataclasses.replace(config, learning_rate=0.5) for config in configs], tiny_data,
                   checkpoint_paths=[paths[0], tmp_path / "d.ckpt"])


@pytest.mark.slow
def test_the_bn_lstm_trains_as_stacked_runs_of_the_one_loop(tiny_data):
    # The recurrent net (bnjax/nets/recurrent.py), per-step statistics and all, is
    # one more model of the same loop: two seeds in one vmapped program of 3
    # steps per dispatch give each run's own History and state.
    lstm = TrainConfig(**{**paper_settings(batch_norm=True), "lstm_hidden_size": 8, "batch_size": 32},
                       max_steps=6, eval_every=3, eval_batch_size=32, eval_statistics="precise", precise_bn_batches=2)
    configs = [dataclasses.replace(lstm, seed=seed) for seed in (0, 1)]
    together = train_many(configs, tiny_data, strategy=Strategy(steps_per_dispatch=3, models_per_program=2))
    for config, result in zip(configs, together):
        alone = train(config, tiny_data)
        assert_same_run(result, alone)
        np.testing.assert_allclose(result[0].precise_val_loss, alone[0].precise_val_loss, rtol=RELATIVE_TOLERANCE)
    assert together[0][1].batch_stats["bn_cell"]["mean"].shape == (28, 8)


def two_device_views(monkeypatch):
    """This process's one CPU device seen twice: train_many then spreads runs over "two devices",
    a thread each (the real thing, 8 devices and the absence of collectives: tests/test_parallel.py)."""
    device = jax.devices()[0]
    monkeypatch.setattr(jax, "devices", lambda *args: [device, device])
    monkeypatch.setattr(jax, "local_devices", lambda *args: [device, device])
    monkeypatch.setattr(jax, "device_count", lambda *args: 2)


class FailingProbe:
    def __init__(self, config, data):
        if config.seed == 1:
            raise ValueError("probe of seed 1 failed")

    def __call__(self, state):
        return {}


def test_spread_runs_train_as_alone_report_the_callers_configs_and_raise_errors_as_themselves(tiny_data,
                                                                                             monkeypatch):
    configs = [TrainConfig(batch_norm=True, model="mlp", max_steps=4, eval_every=2, seed=seed) for seed in range(3)]
    alone = [train_many([config], tiny_data)[0][0] for config in configs]
    two_device_views(monkeypatch)
    placements = []
    train_group = engine._train_group
    monkeypatch.setattr(engine, "_train_group", lambda *args, **kwargs: placements.append(
        ([args[2][index].num_devices for index in args[1]], kwargs.get("devices"))) or train_group(*args, **kwargs))
    heard = []
    results = train_many(configs, tiny_data, strategy=Strategy(models_per_program=1),
                         observer=observer(on_eval=lambda config, *_: heard.append(any(config is c for c in configs))))
    assert sorted(placements, key=str) == [([1], [jax.devices()[0]])] * 3  # each run alone on "one device"
    assert heard and all(heard) and len(heard) == 6
    for (history, _), expected in zip(results, alone):
        assert history.val_loss == expected.val_loss and history.train_loss == expected.train_loss
    with pytest.raises(ValueError, match="^probe of seed 1 failed$"):
        train_many(configs, tiny_data, strategy=Strategy(models_per_program=1), observer=observer(FailingProbe))
