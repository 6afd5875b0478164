"""bnjax's studies, one module per study (docs/layout.md), each a program:
`python -m experiments.<study>`. Where they start, before any JAX
computation, they take bnjax's XLA:CPU settings (bnjax/support/xla_flags.py)."""

from bnjax.support.xla_flags import use_cpu_flags

use_cpu_flags()
