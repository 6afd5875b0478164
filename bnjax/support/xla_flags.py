"""XLA:CPU flags that make the article's nets train faster, set by the project
itself (never asked of the user's shell).

`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` sends every
convolution to XLA:CPU's Eigen kernels instead of YNNPACK fusions, which are
slower for these small 3x3 convolutions at batch 32 (measured with
`python -m benchmarks.throughput`, docs/performance.md). It changes which
kernel computes a convolution, so float round-off differs from a run without
it (curves agree to ~1e-6 over a few steps; chaotic runs drift apart later).

XLA reads XLA_FLAGS once, when a backend initializes, and aborts on a flag it
does not know; so the flag is added only for a jaxlib known to have it, and
only if the user has not set that flag already. BNJAX_XLA_FLAGS=0 skips it.

Nothing sets them as a side effect: a program calls `bnjax.use_cpu_flags()`
where it starts, as bnjax's own do (python -m bnjax, the studies, the
benchmarks, the test run), and as it calls `bnjax.use_persistent_cache()`.
"""

from __future__ import annotations

import os
from importlib import metadata

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
MIN_JAXLIB = (0, 10)  # the oldest jaxlib these flags were checked with
DISABLE_ENV_VAR = "BNJAX_XLA_FLAGS"


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "0.10.2" or "0.7.1rc1"."""
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def use_cpu_flags() -> list[str]:
    """Append bnjax's XLA:CPU flags (`CPU_FLAGS`) to XLA_FLAGS, where a program starts.

    Returns:
      The flags added: none where BNJAX_XLA_FLAGS=0, where the installed
      jaxlib predates them, where the user set them already, or where a JAX
      backend has started in this process (XLA has read XLA_FLAGS; a run's
      launch record then records the flags that were in force).
    """
    if os.environ.get(DISABLE_ENV_VAR, "1") == "0":
        return []
    try:
        jaxlib_version = version_tuple(metadata.version("jaxlib"))
    except metadata.PackageNotFoundError:
        return []
    if jaxlib_version < MIN_JAXLIB or backend_started():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [flag for flag in CPU_FLAGS if flag.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def backend_started() -> bool:
    """Whether a JAX backend has started in this process (XLA has read XLA_FLAGS).

    JAX has no public question for it. Its `jax_num_cpu_devices` setting
    must be set before the backends start and refuses a new value once they
    have (RuntimeError); so another value is offered, and the current one
    put back where it was taken."""
    import sys

    if "jax" not in sys.modules:
        return False
    import jax

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def for_subprocess(environment: dict) -> dict:
    """`environment` for a worker process that must compile as this one does:
    without this process's flags, the worker does not add them either."""
    current = environment.get("XLA_FLAGS", "")
    if all(flag.split("=")[0] in current for flag in CPU_FLAGS):
        return dict(environment)
    return {**environment, DISABLE_ENV_VAR: "0"}
