"""bnjax: Batch Normalization in JAX, written to be read, run and measured.

    import bnjax
    norm = functools.partial(bnjax.BatchNorm, momentum=0.9)   # where flax takes nn.BatchNorm

`bnjax.BatchNorm` is a drop-in for `flax.linen.BatchNorm` with bnjax's
variants one keyword away (bnjax/batchnorm.py).

Importing bnjax changes nothing global. bnjax's own programs (python -m
bnjax, the studies, the benchmarks) and its training functions set the
XLA:CPU flags its speed figures were measured with where they start, if no
JAX computation has run yet (bnjax/xla_flags.py).
"""

from bnjax.batchnorm import KERAS_BN, BatchNorm, Renorm
from bnjax.checkup import Checkup, accuracy, checkup
from bnjax.update_bn import update_bn

__all__ = ["BatchNorm", "KERAS_BN", "Renorm", "update_bn", "checkup", "Checkup", "accuracy"]
