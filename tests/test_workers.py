"""bnjax.workers: tasks run in worker processes, pinned where the platform
can pin; results, progress, errors and crashes come back to the caller, and
workers end with their parent (with prctl or, without it, by watchdog)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from bnjax.engine.workers import WorkerPool
from bnjax.support import host


def where_am_i(shared, progress, task):
    print("a worker's print goes to stderr, not into the results")
    progress(f"task {task} started")
    return task, shared["offset"] + task, host.usable_core_ids()


def fail(shared, progress, message):
    raise ValueError(message)


def crash(shared, progress):
    os._exit(3)


def sleep_a_minute(shared, progress):
    progress("sleeping")
    time.sleep(60)


@pytest.fixture
def importable_here(monkeypatch):
    # Workers are fresh processes: they import this test module by name.
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def test_each_task_runs_once_on_a_pinned_worker_and_reports_progress(importable_here):
    progress = []
    with WorkerPool(cores=[0, 0], shared={"offset": 100}) as pool:
        results = dict(pool.run(where_am_i, [(task,) for task in range(5)],
                                lambda task_index, message: progress.append((task_index, message))))
    assert sorted(results) == [0, 1, 2, 3, 4]
    for task_index, (task, value, cores) in results.items():
        # Pinned to core 0 where the platform can pin; elsewhere no core set to ask for.
        assert task == task_index and value == 100 + task and cores == ([0] if host.can_pin() else None)
    assert sorted(progress) == [(task, f"task {task} started") for task in range(5)]


def test_an_error_in_a_task_reaches_the_caller_as_itself(importable_here):
    with WorkerPool(cores=[0], shared=None) as pool:
        with pytest.raises(ValueError, match="^batch_size 7 is wrong$"):
            list(pool.run(fail, [("batch_size 7 is wrong",)]))


def test_a_crashed_worker_is_reported_not_waited_for(importable_here):
    with WorkerPool(cores=[0], shared=None) as pool:
        with pytest.raises(RuntimeError, match=r"worker process 0 exited \(code 3\) during task 0"):
            list(pool.run(crash, [()]))


# A parent that starts one worker on a minute-long task, says the worker's pid
# once the task is running, and waits.
PARENT = """
import sys
from bnjax.engine.workers import WorkerPool
from bnjax.support import host
import test_workers
pool = WorkerPool(cores=[0], shared=None)
def started(task, message):
    print(pool._workers[0].pid, flush=True)
list(pool.run(test_workers.sleep_a_minute, [()], started))
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the test reads /proc to see the worker")
@pytest.mark.parametrize("without_prctl", [False, True], ids=["prctl", "watchdog"])
def test_workers_end_when_their_parent_is_killed(importable_here, monkeypatch, without_prctl):
    if without_prctl:  # the parent and its worker as on macOS or Windows: no prctl, no affinity calls
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "without_linux")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ["PYTHONPATH"]]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the worker outlived its killed parent"


def test_a_script_without_a_main_guard_can_use_workers(tmp_path, importable_here):
    # A worker never re-imports the caller's __main__ (a spawned
    # multiprocessing worker would, and run this script's body again).
    script = tmp_path / "no_guard.py"
    script.write_text("from bnjax.engine.workers import WorkerPool\n"
                      "from test_workers import where_am_i\n"
                      "print('body ran', flush=True)\n"
                      "with WorkerPool(cores=[0, 0], shared={'offset': 10}) as pool:\n"
                      "    print(sorted(value for _, (_, value, _) in pool.run(where_am_i, [(1,), (2,)])))\n")
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "body ran\n[11, 12]\n"
