"""Faults injected on purpose: sweeps and single runs killed at seeded random
moments (SIGKILL, and Ctrl-C's SIGINT), and every kind of file bnjax writes
garbled (results, checkpoints, the data cache). After each kill nothing
written is half-written and no worker process is left; the rerun resumes to
exactly what an uninterrupted run gives. Every garbled file is refused in one
line. Every process has a time limit. docs/reliability.md lists the promises
these tests hold."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bnjax.data import datasets as data_module
from bnjax.data.datasets import DataError, load_cache, save_cache
from bnjax.training.checkpoint import restore_checkpoint
from bnjax.training.steps import create_train_state
from conftest import make_dataset
from experiments.results import load_results

pytestmark = pytest.mark.slow  # processes started and killed, JAX started in each

TESTS = Path(__file__).parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
TIME_LIMIT_S = 300  # any one process; each takes 10-15 s on 2 cores, most of it starting JAX and compiling
TIMING = ("wall_time_s", "total_wall_time_s", "eval_time_s", "eval_statistics_time_s")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "fault_run.py"), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*args) -> float:
    """Run fault_run.py to its end; the seconds from its first trained steps to its end."""
    process = start(*args)
    training_started(process)
    began = time.perf_counter()
    _, err = process.communicate(timeout=TIME_LIMIT_S)
    assert process.returncode == 0, err[-3000:]
    return time.perf_counter() - began


def training_started(process: subprocess.Popen) -> None:
    """Wait until `process` reports its first trained steps (or ends)."""
    watchdog = threading.Timer(TIME_LIMIT_S, process.kill)
    watchdog.start()
    for line in process.stdout:
        if "step " in line:
            break
    watchdog.cancel()


def kill_after(process: subprocess.Popen, seconds: float, sig=signal.SIGKILL) -> tuple[int, str, str]:
    """Send `sig` to `process` after `seconds` (or when it ends, if sooner); its exit code and output."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(sig)
    out, err = process.communicate(timeout=TIME_LIMIT_S)
    return process.returncode, out, err


def workers_of(pid: int) -> list[int]:
    """Live worker processes started by process `pid` (bnjax/engine/workers.py names its parent on the command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"worker_main({pid})" in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def without_timing(runs: list[dict]) -> dict:
    return {json.dumps(run["config"], sort_keys=True): {k: v for k, v in run.items() if k not in TIMING}
            for run in runs}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The sweep and the single run, each once without a fault, and how long each trained."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    sweep_s = finish("sweep", folder / "results.json")
    single_s = finish("single", folder / "run.ckpt", folder / "history.json")
    return {"folder": folder, "sweep_s": sweep_s, "single_s": single_s,
            "runs": without_timing(load_results(folder / "results.json")["runs"]),
            "history": {k: v for k, v in json.loads((folder / "history.json").read_text()).items() if k not in TIMING}}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find worker processes")
def test_a_sweep_killed_at_random_moments_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path):
    rng = random.Random(26)
    path = tmp_path / "results.json"
    for attempt in range(3):
        process = start("sweep", path)
        training_started(process)
        kill_after(process, rng.uniform(0.05, 0.95) * uninterrupted["sweep_s"])
        # Whatever was saved is whole: absent, or a results file whose every run is complete.
        if path.exists():
            saved = without_timing(load_results(path)["runs"])
            assert all(saved[key] == uninterrupted["runs"][key] for key in saved), f"attempt {attempt}"
        deadline = time.monotonic() + 15
        while workers_of(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not workers_of(process.pid), f"workers outlived their killed parent (attempt {attempt})"
    # Ctrl-C once training is under way: one line, the shell's code for it, no traceback.
    process = start("sweep", path)
    training_started(process)
    code, _, err = kill_after(process, 0.5, signal.SIGINT)
    if code != 0:  # not already finished
        assert code == 130 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1] == "interrupted; finished runs are saved and will be skipped next time"
    finish("sweep", path)
    assert without_timing(load_results(path)["runs"]) == uninterrupted["runs"]  # bit for bit


def test_a_single_run_killed_at_random_moments_resumes_to_the_same_history(uninterrupted, tmp_path):
    rng = random.Random(260)
    checkpoint, out = tmp_path / "run.ckpt", tmp_path / "history.json"
    for _ in range(3):
        process = start("single", checkpoint, out)
        training_started(process)
        kill_after(process, rng.uniform(0.05, 0.95) * uninterrupted["single_s"])
        assert not out.exists() or json.loads(out.read_text())["steps"][-1] == 1000  # whole, or not there
    finish("single", checkpoint, out)
    history = {k: v for k, v in json.loads(out.read_text()).items() if k not in TIMING}
    assert history == uninterrupted["history"]


def test_a_run_beside_busy_processes_gives_the_idle_runs_history(uninterrupted, tmp_path):
    # XLA:CPU could in principle split its work by how busy the cores are; it
    # splits by the threads the process has, so load changes the time only.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * os.cpu_count())]
    try:
        finish("single", tmp_path / "run.ckpt", tmp_path / "history.json")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    history = {k: v for k, v in json.loads((tmp_path / "history.json").read_text()).items() if k not in TIMING}
    assert history == uninterrupted["history"]


# ---------------------------------------------------------------- garbled files

def garblings(content: bytes, seed: int, protected_tail: int = 0) -> dict[str, bytes]:
    """Ways a file gets damaged, at seeded random places: cut short, bytes
    overwritten in the middle, emptied, junk appended, zeroed out. Cuts keep
    clear of the last `protected_tail` bytes (a trailing newline, whose loss
    loses nothing)."""
    rng = random.Random(seed)
    length = len(content)
    cut = rng.randrange(1, length - protected_tail)
    where = rng.randrange(length // 4, 3 * length // 4)
    junk = bytes(rng.randrange(128, 256) for _ in range(16))  # never valid UTF-8 text, never valid msgpack tail
    return {
        "truncated": content[:cut],
        "overwritten": content[:where] + junk + content[where + len(junk):],
        "empty": b"",
        "junk-appended": content + junk,
        "zeroed": bytes(length),
    }


def test_a_garbled_results_file_is_refused_in_one_line_and_left_as_it_was(uninterrupted, tmp_path):
    content = (uninterrupted["folder"] / "results.json").read_bytes()
    last_brace = content.rindex(b"}")
    for name, garbled in garblings(content, seed=1, protected_tail=len(content) - last_brace).items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(garbled)
        with pytest.raises(SystemExit) as exit_info:
            load_results(path)
        message = str(exit_info.value.code)
        assert message.startswith(f"error: cannot read {path} ") or message.startswith(f"error: {path} "), message
        assert len(message.splitlines()) == 1 and path.read_bytes() == garbled, name


def test_a_garbled_checkpoint_is_refused_in_one_line_or_restores_what_was_saved(uninterrupted, tmp_path):
    # Every file of the orbax folder garbled in every way, one at a time: a
    # file orbax does not read back (its own commit markers, metadata it
    # rewrites) changes nothing, so the promise is "refused in one line, or
    # exactly the saved state and History", never other numbers.
    import shutil

    import jax

    from fault_run import BASE

    saved_folder = uninterrupted["folder"] / "run.ckpt"
    template = create_train_state(BASE, jax.random.key(BASE.seed))
    saved_state, saved_history = restore_checkpoint(saved_folder, template, BASE)  # the ungarbled folder loads
    files = sorted(file.relative_to(saved_folder) for file in saved_folder.rglob("*") if file.is_file())
    refused = set()
    for index, relative in enumerate(files):
        content = (saved_folder / relative).read_bytes()
        for name, garbled in (garblings(content, seed=2 + index) if len(content) > 1 else {"empty": b""}).items():
            path = tmp_path / f"{index}-{name}"
            shutil.copytree(saved_folder, path)
            (path / relative).write_bytes(garbled)
            try:
                state, history = restore_checkpoint(path, template, BASE)
            except ValueError as error:
                assert str(error).startswith(f"checkpoint {path} ") and len(str(error).splitlines()) == 1, name
                refused.add(str(relative))
                continue
            finally:
                shutil.rmtree(path, ignore_errors=True)
            assert history == saved_history, (relative, name)
            jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, saved_state.params)
            jax.tree_util.tree_map(np.testing.assert_array_equal, state.opt_state, saved_state.opt_state)
            jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats, saved_state.batch_stats)
    # The arrays and the run's JSON are what a resumed run reads: garbling them is always caught.
    assert any("/state/" in f"/{name}" and "/d/" in f"/{name}" for name in refused), refused
    assert any(name.endswith("run/metadata") for name in refused), refused


def test_a_garbled_checkpoint_file_of_earlier_bnjax_is_refused_in_one_line(tmp_path):
    from flax import serialization

    from bnjax.training.checkpoint import read_checkpoint

    content = (TESTS / "fixtures" / "flat_form_checkpoint.msgpack").read_bytes()
    read_checkpoint(TESTS / "fixtures" / "flat_form_checkpoint.msgpack")  # the ungarbled file loads
    garbled_files = {f"{name}.msgpack": garbled for name, garbled in garblings(content, seed=2).items()}
    for missing in ("sha256", "payload"):  # a wrapper of the right format whose checksum or payload is missing
        wrapper = serialization.msgpack_restore(content)
        del wrapper[missing]
        garbled_files[f"no-{missing}.msgpack"] = serialization.msgpack_serialize(wrapper)
    for name, garbled in garbled_files.items():
        path = tmp_path / name
        path.write_bytes(garbled)
        with pytest.raises(ValueError) as error:
            read_checkpoint(path)
        assert str(error.value).startswith(f"checkpoint {path} ") and len(str(error.value).splitlines()) == 1, name


def test_a_garbled_data_cache_is_refused_in_one_line_or_gives_the_saved_data(tmp_path, monkeypatch):
    # The synthetic set is not MNIST: MNIST's own checks are left out here,
    # the cache's integrity checks (zip, CRC, SHA-256 of the arrays) are what
    # is tested. Junk after a zip's end leaves every array intact: the cache
    # then gives exactly the saved data, which is all it promises.
    monkeypatch.setattr(data_module, "verify_mnist", lambda data, name: data)
    saved = make_dataset()
    path = tmp_path / "mnist.npz"
    save_cache(path, saved, source="synthetic")
    refused = []
    for name, garbled in garblings(path.read_bytes(), seed=3).items():
        path.write_bytes(garbled)
        try:
            loaded = load_cache(path)
        except DataError as error:
            assert re.match(r"unreadable \(|its contents do not match their SHA-256", str(error)), (name, error)
            assert len(str(error).splitlines()) == 1, name
            refused.append(name)
            continue
        for array, saved_array in zip(loaded, saved):
            np.testing.assert_array_equal(array, saved_array, err_msg=name)
    assert refused == ["truncated", "overwritten", "empty", "zeroed"]
