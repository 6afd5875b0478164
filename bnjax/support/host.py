"""What this computer offers a bnjax process, asked in the way each platform
allows: the CPU cores it may use, pinning a process to cores, the CPU's
name and ending a child process with its parent.

Linux has calls the others lack (`os.sched_getaffinity`,
`os.sched_setaffinity`, `prctl`, `/proc/cpuinfo`); macOS and Windows have
none of them. Every function here asks for the call itself, never for the
platform's name, and falls back to what the standard library offers
everywhere; what cannot be had is reported as unknown (None or False),
never guessed. The test suite also runs with the Linux-only
calls removed, so each fallback is exercised on Linux too.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import sys
import threading
import time


def usable_core_ids() -> list[int] | None:
    """The ids of the CPU cores this process may run on (Linux's affinity
    mask), or None where the platform cannot say which ones (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def core_ids_to_hand_out() -> list[int]:
    """One id per usable core, for work spread one per core: the affinity
    mask's ids where the platform has one (a worker can be pinned to each),
    else 0 .. N-1, which only number the workers (they share the cores)."""
    return usable_core_ids() or list(range(usable_core_count() or 1))


def usable_core_count() -> int | None:
    """How many CPU cores this process may use: `os.process_cpu_count()`
    (Python >= 3.13, which honours an affinity mask on Linux and Windows),
    else the affinity mask, else `os.cpu_count()`; None if none can say."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count()
    cores = usable_core_ids()
    return len(cores) if cores is not None else os.cpu_count()


def can_pin() -> bool:
    """Whether this process can be restricted to chosen cores here."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def pin_to_cores(cores: set[int]) -> bool:
    """Restrict this process to `cores`; return whether that was possible
    (False where the platform has no affinity call: nothing changes)."""
    if not can_pin():
        return False
    os.sched_setaffinity(0, cores)
    return True


def limit_cores(count: int) -> bool:
    """Restrict this process to its first `count` usable cores (fewer only:
    never more than it has); return whether its cores are now `count` or fewer."""
    if not can_pin():
        return False
    cores = usable_core_ids()
    if count < len(cores):
        os.sched_setaffinity(0, set(cores[:count]))
    return True


def cpu_name() -> str | None:
    """The CPU's name: Linux's /proc/cpuinfo, macOS's `sysctl
    machdep.cpu.brand_string`, else `platform.processor()` (Windows gives its
    family and model there); None where none of them says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            if brand:
                return brand
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _linux_parent_death_signal() -> bool:
    """Ask Linux to send SIGTERM when the parent ends (`prctl`); False where there is no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no prctl in it
        return False
    return prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM)) == 0


def _parent_alive(parent: int) -> bool:
    if os.getppid() != parent:  # POSIX re-parents an orphan (to init or a subreaper)
        return False
    if sys.platform == "win32":  # Windows keeps the dead parent's id: ask whether that process still runs
        synchronize, wait_timeout = 0x00100000, 0x00000102
        kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(synchronize, False, parent)
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == wait_timeout
        finally:
            kernel32.CloseHandle(handle)
    return True


def end_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Make this process end when process `parent` ends, even when that one is
    killed outright: Linux's parent-death signal where there is prctl, else a
    daemon thread that checks every `poll_s` seconds whether the parent is
    still there. Ends now if the parent is gone already."""
    by_signal = _linux_parent_death_signal()
    if not _parent_alive(parent):
        os._exit(1)
    if not by_signal:
        def watch():
            while _parent_alive(parent):
                time.sleep(poll_s)
            os._exit(1)

        threading.Thread(target=watch, name="bnjax-parent-watchdog", daemon=True).start()
