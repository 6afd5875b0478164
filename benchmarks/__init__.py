"""bnjax's speed measurements, each a program: `python -m benchmarks.<name>`.
Where they start, before any JAX computation, they take bnjax's XLA:CPU
settings (bnjax/support/xla_flags.py), as the figures they print were measured with."""

from bnjax.support.xla_flags import use_cpu_flags

use_cpu_flags()
