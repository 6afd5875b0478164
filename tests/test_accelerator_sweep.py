"""benchmarks/accelerator_sweep.py: its argument checks and how it assembles
and scales what its contender processes report (never their timings: the
contenders are replaced by canned reports here; the real run is one command,
docs/performance.md)."""

import json

import pytest

import benchmarks.peers
from benchmarks import accelerator_sweep

COLD = {"seconds": 40.0, "compile_seconds": 25.0, "run_steps": 168750, "device": "NVIDIA H200 (gpu)",
        "mean_final_val_accuracy": 0.9, "environment": {"jax": "0.10.2", "bnjax_commit": "abc"}}
WARM = {**COLD, "seconds": 15.0, "compile_seconds": 0.5}
EAGER = {"setup_seconds": 0.0, "measured_seconds": 60.0, "fraction": 0.2, "steps_per_run": 1125}
CUDAGRAPHS = {"setup_seconds": 30.0, "measured_seconds": 20.0, "fraction": 0.2, "steps_per_run": 1125}
STACKING = {"run_steps_per_s": {"1": 3800.0, "16": 50000.0}, "per_run_share": {"1": 1.0, "16": 0.82}}
WHOLE = {"setup_seconds": 0.0, "measured_seconds": 90.0, "fraction": 1.0, "steps_per_run": 5625}


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds: expected a positive integer, got '0'"),
    (["--peers", "eager,jit"], "unknown peer 'jit'; allowed: eager, cudagraphs, vmap, or none"),
    (["--variants", "float16"], "unknown variant 'float16'; allowed: bfloat16, highest, or none"),
    (["--peer-fraction", "1.5"], "--peer-fraction: must be a number in (0, 1], got '1.5'"),
    (["--out", "."], "--out . is a directory; give a file path"),
    (["--out", "no/such/folder/x.json"], "its folder no/such/folder does not exist"),
])
def test_bad_arguments_get_one_line_errors_before_any_work(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(accelerator_sweep, "run_contender", lambda *a: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exit_info:
        accelerator_sweep.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_file_holds_the_workload_cold_and_warm_and_each_peer_scaled_up(tmp_path, monkeypatch):
    reports = {"eager": EAGER, "cudagraphs": CUDAGRAPHS, "vmap": WHOLE, "stacking": STACKING}
    started = []

    def contender(argv, name, env):
        started.append((name, env.get("JAX_COMPILATION_CACHE_DIR")))
        return dict(COLD if len(started) == 1 else WARM) if name == "bnjax" else dict(reports[name])

    monkeypatch.setattr(accelerator_sweep, "run_contender", contender)
    monkeypatch.setattr(benchmarks.peers, "available", lambda: {"pytorch": None, "keras-tf": "not installed"})
    out = tmp_path / "sweep.json"
    accelerator_sweep.main(["--seeds", "5", "--variants", "none", "--out", str(out)])
    # cold and warm share one fresh compilation cache; the peers run without it
    assert [name for name, _ in started] == ["bnjax", "bnjax", "stacking", "eager", "cudagraphs", "vmap"]
    assert started[0][1] == started[1][1] == started[2][1] and started[0][1] is not None
    result = json.loads(out.read_text())
    assert result["workload"] == {"runs": 30, "epochs": 3, "max_steps": None, "eval_every": 100, "precise_bn": True}
    assert (result["device"], result["jax"], result["bnjax_commit"]) == ("NVIDIA H200 (gpu)", "0.10.2", "abc")
    bnjax = result["bnjax"]
    assert (bnjax["seconds_cold"], bnjax["seconds_warm"], bnjax["compile_seconds"]) == (40.0, 15.0, 25.0)
    assert bnjax["run_steps_per_s"] == 168750 / 15.0
    peers = result["peers"]
    assert (peers["pytorch-eager"]["seconds"], peers["pytorch-eager"]["extrapolated"]) == (300.0, True)
    assert (peers["pytorch-cudagraphs"]["seconds"], peers["pytorch-cudagraphs"]["extrapolated"]) == (130.0, True)
    assert (peers["pytorch-vmap"]["seconds"], peers["pytorch-vmap"]["extrapolated"]) == (90.0, False)
    assert result["stacking"] == STACKING


def test_peers_without_pytorch_are_recorded_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator_sweep, "run_contender",
                        lambda argv, name, env: dict(COLD) if name == "bnjax" else pytest.fail("peer started"))
    monkeypatch.setattr(benchmarks.peers, "available", lambda: {"pytorch": "torch not installed", "keras-tf": None})
    out = tmp_path / "sweep.json"
    accelerator_sweep.main(["--peers", "eager", "--no-stacking", "--out", str(out)])
    assert json.loads(out.read_text())["peers"] == {
        "pytorch-eager": {"seconds": None, "extrapolated": False, "skipped": "torch not installed"}}


def test_each_precision_variant_runs_cold_and_warm_with_its_arithmetic(tmp_path, monkeypatch):
    started = []

    def contender(argv, name, env):
        variant = argv[argv.index("--variant") + 1] if "--variant" in argv else "default"
        started.append((name, variant))
        run = sum(1 for entry in started if entry == (name, variant))
        return {**(COLD if run == 1 else WARM), "precision": f"{variant} arithmetic"}

    monkeypatch.setattr(accelerator_sweep, "run_contender", contender)
    out = tmp_path / "sweep.json"
    accelerator_sweep.main(["--peers", "none", "--no-stacking", "--out", str(out)])
    assert started == [("bnjax", "default")] * 2 + [("bnjax", "bfloat16")] * 2 + [("bnjax", "highest")] * 2
    result = json.loads(out.read_text())
    assert result["bnjax"]["precision"] == "default arithmetic"
    for variant in ("bfloat16", "highest"):
        assert result["variants"][variant] == {"seconds_cold": 40.0, "seconds_warm": 15.0,
                                               "mean_final_val_accuracy": WARM["mean_final_val_accuracy"],
                                               "precision": f"{variant} arithmetic"}
    configs = accelerator_sweep.sweep_configs(accelerator_sweep.parse_args(["--seeds", "1", "--variant", "bfloat16"]))
    assert {config.compute_dtype for config in configs} == {"bfloat16"} and len(configs) == 6
