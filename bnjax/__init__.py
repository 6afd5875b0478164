"""bnjax: Batch Normalization in JAX, written to be read, run and measured.

    import bnjax
    norm = functools.partial(bnjax.BatchNorm, momentum=0.9)   # where flax takes nn.BatchNorm

`bnjax.BatchNorm` is a drop-in for `flax.linen.BatchNorm` with bnjax's
variants one keyword away (bnjax/batchnorm.py).

Importing bnjax sets the XLA:CPU flags its speed figures rely on (see
bnjax/xla_flags.py) — before JAX initializes its CPU backend, so import
bnjax before running any JAX computation. BNJAX_XLA_FLAGS=0 turns this off.
"""

from bnjax.xla_flags import apply_cpu_flags

apply_cpu_flags()

from bnjax.batchnorm import KERAS_BN, BatchNorm, Renorm  # noqa: E402  (after the flags: it imports JAX)

__all__ = ["BatchNorm", "KERAS_BN", "Renorm"]
from bnjax.update_bn import update_bn  # noqa: E402
from bnjax.checkup import Checkup, accuracy, checkup  # noqa: E402

__all__ += ["update_bn", "checkup", "Checkup", "accuracy"]
