"""Worker processes, one CPU core each, for runs that can train side by side.

    with WorkerPool(cores=[0, 1], shared=data) as pool:
        for task_index, result in pool.run(function, [args_0, args_1, ...], on_progress):
            ...

Each worker is a fresh `python -c` process (never a fork of a process that
runs JAX, and never a re-import of the caller's `__main__`, so a script
without an `if __name__ == "__main__":` guard works), pins itself to its core
before JAX starts where the platform can pin (Linux; on macOS and Windows
the workers share the cores, and a core id only names the worker), takes the caller's `sys.path` (so that functions of any
module the caller imported unpickle there) and receives `shared` (the data
set) once. A task calls
`function(shared, progress, *args)` there, where `progress(message)` sends a
message back at once; its return value (or exception) comes back to `run`.
Messages are pickles on the worker's stdin and stdout; the worker's own
prints go to stderr. A worker ends with the process that started it, even
when that one is killed outright (`host.end_with_parent`: Linux's
`PR_SET_PDEATHSIG`, which the kernel sends when the thread that started the
worker ends, so a pool belongs to the thread that made it; elsewhere a
watchdog thread in the worker that checks for its parent twice a second).

Not `concurrent.futures.ProcessPoolExecutor`: forking a process that runs
JAX is unsafe, and its spawn and forkserver workers import the caller's
`__main__` again, so a script without a main guard runs its body again in
every worker and the pool breaks (the workers' tests hold the guardless
script to working); it also gives every worker the same initializer
arguments (one core each needs a shared queue) and streams no progress.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator

from bnjax.support import host, xla_flags

_WORKER_MAIN = "from bnjax.engine.workers import worker_main; worker_main({parent})"


def worker_main(parent: int | None = None) -> None:
    """The loop of one worker process: init, then tasks until stdin closes."""
    if parent is not None:
        host.end_with_parent(parent)
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the pickles
    inbox = sys.stdin.buffer

    def send(message) -> None:
        pickle.dump(message, channel)
        channel.flush()

    # Ctrl-C reaches the whole process group: the caller handles it and
    # closes the pool, so a worker does not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    core, shared_path, shared = pickle.load(inbox)
    sys.path[:] = shared_path  # what the caller can import (a test module, a study), the worker can unpickle
    host.pin_to_cores({core})  # where the platform can pin; elsewhere the workers share the cores
    while True:
        try:
            task_index, function, args = pickle.load(inbox)
        except EOFError:
            return
        try:
            result = function(shared, lambda message: send(("progress", task_index, message)), *args)
            send(("done", task_index, result))
        except Exception as error:  # noqa: BLE001 - handed to the caller, who re-raises it
            try:
                pickle.dumps(error)
            except Exception:  # noqa: BLE001
                error = RuntimeError(f"{type(error).__name__}: {error}")
            send(("error", task_index, error))


class WorkerPool:
    """One worker process per entry of `cores` (a core may appear twice)."""

    def __init__(self, cores: list[int], shared: Any):
        self._messages: queue.Queue = queue.Queue()
        self._workers = []
        self._readers = []
        for worker_index, core in enumerate(cores):
            process = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN.format(parent=os.getpid())],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=xla_flags.for_subprocess(os.environ))  # compile as the caller does
            pickle.dump((core, sys.path, shared), process.stdin)
            process.stdin.flush()
            reader = threading.Thread(target=self._read, args=(worker_index, process.stdout), daemon=True)
            reader.start()
            self._workers.append(process)
            self._readers.append(reader)

    def _read(self, worker_index: int, stream) -> None:
        while True:
            try:
                message = pickle.load(stream)
            except (EOFError, OSError, pickle.UnpicklingError):
                self._messages.put(("exit", None, None, worker_index))
                return
            self._messages.put((*message, worker_index))

    def run(self, function: Callable, tasks: list[tuple], on_progress: Callable[[int, Any], None] | None = None
            ) -> Iterator[tuple[int, Any]]:
        """Yield (task index, result) as tasks finish; each idle worker takes the next task."""
        waiting = list(range(len(tasks)))
        busy: dict[int, int] = {}  # worker -> task

        def hand_out(worker_index: int) -> None:
            if waiting:
                task_index = waiting.pop(0)
                busy[worker_index] = task_index
                stdin = self._workers[worker_index].stdin
                pickle.dump((task_index, function, tasks[task_index]), stdin)
                stdin.flush()

        for worker_index in range(len(self._workers)):
            hand_out(worker_index)
        while busy:
            kind, task_index, payload, worker_index = self._messages.get()
            if kind == "progress":
                if on_progress is not None:
                    on_progress(task_index, payload)
                continue
            if kind == "exit":
                code = self._workers[worker_index].wait()
                raise RuntimeError(f"worker process {worker_index} exited (code {code}) during task "
                                   f"{busy.get(worker_index)}; its stderr is above")
            del busy[worker_index]
            if kind == "error":
                raise payload
            yield task_index, payload
            hand_out(worker_index)

    def close(self) -> None:
        for process in self._workers:
            if process.poll() is None:
                process.kill()
            process.wait()
        # A killed worker's stdout ends, so its reader sees EOF and returns; only
        # then are the streams closed (closing one under a blocked read made that
        # read raise in the reader thread).
        for reader in self._readers:
            reader.join(timeout=10)
        for process in self._workers:
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
