"""bnjax: Batch Normalization in JAX, written to be read, run and measured.

    import bnjax

    norm = functools.partial(bnjax.BatchNorm, momentum=0.9)   # where flax takes nn.BatchNorm
    batch_stats = bnjax.update_bn(model, variables, batches)  # precise BN for any linen model
    report = bnjax.checkup(model, variables, train_batches, eval_batches, metric)  # which BN statistics to trust

    bnjax.use_persistent_cache()  # compiled programs kept on disk, as python -m bnjax does
    data = bnjax.load_mnist()
    history, state = bnjax.train(bnjax.TrainConfig(batch_norm=True), data)        # the plain loop
    results = bnjax.train_many([bnjax.TrainConfig(seed=s) for s in range(3)], data)  # the engine

The folders are the layers, each importing only those below it:
support/ < data/ < bn/ < nets/ < training/ < engine/ (docs/layout.md).
`bnjax.BatchNorm` and `bnjax.nnx.BatchNorm` are drop-ins for flax's linen and
NNX BatchNorm with bnjax's variants one keyword away.

Importing bnjax changes nothing global. bnjax's own programs (python -m
bnjax, the studies, the benchmarks) and its training functions set the
XLA:CPU flags its speed figures were measured with where they start, if no
JAX computation has run yet (support/xla_flags.py).
"""

from bnjax.bn import nnx
from bnjax.bn.batchnorm import KERAS_BN, BatchNorm, Renorm
from bnjax.bn.checkup import Checkup, accuracy, checkup
from bnjax.bn.update_bn import update_bn
from bnjax.data.datasets import load_dataset, load_mnist
from bnjax.engine.launch import train_many
from bnjax.engine.strategy import Strategy
from bnjax.support.compilation_cache import use_persistent_cache
from bnjax.training.config import TrainConfig
from bnjax.training.history import History
from bnjax.training.train import train

__all__ = ["BatchNorm", "KERAS_BN", "Renorm", "nnx", "update_bn", "checkup", "Checkup", "accuracy",
           "TrainConfig", "History", "train", "train_many", "Strategy", "load_mnist", "load_dataset",
           "use_persistent_cache"]
