"""bnjax: Batch Normalization in JAX, written to be read, run and measured.

    import bnjax

    norm = functools.partial(bnjax.BatchNorm, momentum=0.9)   # where flax takes nn.BatchNorm
    batch_stats = bnjax.update_bn(model, variables, batches, train=True)  # precise BN for any linen model
    report = bnjax.checkup(model, variables, train_batches, eval_batches, bnjax.accuracy,  # which statistics to trust
                           train_kwargs={"train": True}, eval_kwargs={"train": False})

    bnjax.use_cpu_flags()         # bnjax's XLA:CPU flags, before any JAX computation, as python -m bnjax does
    bnjax.use_persistent_cache()  # compiled programs kept on disk, as python -m bnjax does
    data = bnjax.load_mnist()
    history, state = bnjax.train(bnjax.TrainConfig(batch_norm=True), data)        # the plain loop
    results = bnjax.train_many([bnjax.TrainConfig(seed=s) for s in range(3)], data)  # the engine

The folders are the layers, each importing only those below it:
support/ < data/ < bn/ < nets/ < training/ < engine/ (docs/layout.md).
`bnjax.BatchNorm` and `bnjax.nnx.BatchNorm` are drop-ins for flax's linen and
NNX BatchNorm with bnjax's variants one keyword away.

Importing bnjax, or calling it, changes nothing global. A program asks for
what it wants where it starts: `use_cpu_flags()` (the XLA:CPU flags bnjax's
speed figures were measured with; before any JAX computation) and
`use_persistent_cache()`, as bnjax's own programs (python -m bnjax, the
studies, the benchmarks) do.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"  # CHANGELOG.md says what each version changed

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use (below)
    from bnjax import nnx
    from bnjax.bn.batchnorm import BatchNorm, Renorm, keras_bn
    from bnjax.bn.checkup import Checkup, accuracy, checkup
    from bnjax.bn.update_bn import update_bn
    from bnjax.data.datasets import load_dataset, load_mnist
    from bnjax.engine.launch import Observer, train_many
    from bnjax.engine.strategy import Strategy
    from bnjax.support.compilation_cache import use_persistent_cache
    from bnjax.support.xla_flags import use_cpu_flags
    from bnjax.training.config import TrainConfig
    from bnjax.training.history import History
    from bnjax.training.tensorboard import TensorBoardLog, write_tensorboard
    from bnjax.training.train import train

# The front door's names and the modules they live in, imported when first
# used: `import bnjax` stays quick, and `python -m bnjax` starts listening for
# Ctrl-C before the slow imports.
_EXPORTS = {
    "BatchNorm": "bnjax.bn.batchnorm", "keras_bn": "bnjax.bn.batchnorm", "Renorm": "bnjax.bn.batchnorm",
    "nnx": "bnjax.nnx", "update_bn": "bnjax.bn.update_bn",
    "checkup": "bnjax.bn.checkup", "Checkup": "bnjax.bn.checkup", "accuracy": "bnjax.bn.checkup",
    "TrainConfig": "bnjax.training.config", "History": "bnjax.training.history", "train": "bnjax.training.train",
    "train_many": "bnjax.engine.launch", "Observer": "bnjax.engine.launch", "Strategy": "bnjax.engine.strategy",
    "write_tensorboard": "bnjax.training.tensorboard", "TensorBoardLog": "bnjax.training.tensorboard",
    "load_mnist": "bnjax.data.datasets", "load_dataset": "bnjax.data.datasets",
    "use_persistent_cache": "bnjax.support.compilation_cache", "use_cpu_flags": "bnjax.support.xla_flags",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bnjax' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "nnx" else getattr(module, name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
