"""bnjax: Batch Normalization in JAX, written to be read, run and measured.

Importing bnjax sets the XLA:CPU flags its speed figures rely on (see
bnjax/xla_flags.py) — before JAX initializes its CPU backend, so import
bnjax before running any JAX computation. BNJAX_XLA_FLAGS=0 turns this off.
"""

from bnjax.xla_flags import apply_cpu_flags

apply_cpu_flags()
