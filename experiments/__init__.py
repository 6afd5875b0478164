"""bnjax's studies, one module per study (docs/layout.md), each a program:
`python -m experiments.<study>`. Where they start, before any JAX
computation, they take bnjax's XLA:CPU settings (bnjax/support/xla_flags.py)."""

from bnjax.support.xla_flags import apply_cpu_flags

apply_cpu_flags()
