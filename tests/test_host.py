"""bnjax.support.host: what a Mac, a Windows laptop or Linux offers a bnjax
process, each platform's calls removed in turn; unknown stays unknown."""

import os
import platform
import subprocess
import sys

import pytest

from bnjax.support import host

WITHOUT_LINUX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "without_linux")


def without(monkeypatch, *names):
    """Remove os functions as a platform without them lacks them; without the
    affinity call, os.process_cpu_count (3.13) is os.cpu_count, as os.py
    defines it there (its Linux version would call the removed function)."""
    for name in names:
        monkeypatch.delattr(os, name, raising=False)
    if "sched_getaffinity" in names and hasattr(os, "process_cpu_count"):
        monkeypatch.setattr(os, "process_cpu_count", os.cpu_count)


def test_cores_from_process_cpu_count_then_the_affinity_mask_then_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    assert host.usable_core_count() == 3
    monkeypatch.delattr(os, "process_cpu_count")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 6}, raising=False)
    assert host.usable_core_count() == 2 and host.usable_core_ids() == [4, 6]
    without(monkeypatch, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 10)
    assert host.usable_core_count() == 10 and host.usable_core_ids() is None


def test_no_count_at_all_is_unknown_not_one(monkeypatch):
    without(monkeypatch, "process_cpu_count", "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert host.usable_core_count() is None


def test_without_affinity_calls_nothing_is_pinned_and_that_is_said(monkeypatch):
    without(monkeypatch, "sched_getaffinity", "sched_setaffinity")
    assert not host.can_pin()
    assert host.pin_to_cores({0}) is False and host.limit_cores(1) is False
    assert host.core_ids_to_hand_out() == list(range(host.usable_core_count()))  # numbers for unpinned workers


def test_the_cpu_name_where_there_is_no_proc_cpuinfo(monkeypatch):
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(platform, "processor", lambda: "Intel64 Family 6 Model 158 Stepping 10, GenuineIntel")
    assert host.cpu_name() == "Intel64 Family 6 Model 158 Stepping 10, GenuineIntel"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert host.cpu_name() is None  # unknown, not the machine's architecture passed off as a CPU name

    monkeypatch.setattr(sys, "platform", "darwin")  # macOS: sysctl's brand string
    asked = []

    def sysctl(command, **kwargs):
        asked.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="Apple M2 Pro\n", stderr="")

    monkeypatch.setattr(subprocess, "run", sysctl)
    assert host.cpu_name() == "Apple M2 Pro" and asked == [["sysctl", "-n", "machdep.cpu.brand_string"]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the name in /proc/cpuinfo is Linux's")
def test_on_linux_the_cpu_name_is_proc_cpuinfos():
    if not os.path.exists("/proc/cpuinfo") or "BNJAX_WITHOUT_LINUX" in os.environ:
        pytest.skip("no /proc/cpuinfo for bnjax here")
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    if not names:
        pytest.skip("this kernel's /proc/cpuinfo names no model (e.g. some ARM machines)")
    assert host.cpu_name() == names[0]


def test_the_laptop_configuration_removes_every_linux_only_call():
    # What CI's laptop pass relies on: in a process started with
    # tests/without_linux on its path, bnjax finds none of Linux's calls.
    probe = ("import os, json; from bnjax.support import host; "
             "print(json.dumps([hasattr(os, 'sched_getaffinity'), hasattr(os, 'sched_setaffinity'), "
             "host._linux_parent_death_signal(), host.usable_core_ids(), host.can_pin(), "
             "host.usable_core_count() == (os.process_cpu_count() if hasattr(os, 'process_cpu_count') "
             "else os.cpu_count())]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [WITHOUT_LINUX, os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[false, false, false, null, false, true]"


def test_provenance_records_what_it_cannot_know_as_unknown(monkeypatch):
    from bnjax.support import provenance

    monkeypatch.setattr(host, "cpu_name", lambda: None)
    monkeypatch.setattr(host, "usable_core_count", lambda: None)
    environment = provenance.environment()
    assert environment["cpu"] is None and environment["cpu_cores"] is None
    line = provenance.describe_environment(environment)
    assert line.startswith(f"a CPU of unknown name ({platform.machine()}); jax ")


def test_provenance_names_this_checkouts_commit_and_its_changes():
    # The commit of the checkout bnjax/ sits in, "+changes" exactly when git
    # sees changes under bnjax/ or experiments/ there.
    from bnjax.support import provenance

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert str(provenance.REPOSITORY) == root  # git asked there, with paths relative to it

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        pytest.skip("not a git checkout")
    changed = bool(git("status", "--porcelain", "--", "bnjax", "experiments"))
    assert provenance.bnjax_commit() == head + ("+changes" if changed else "")
