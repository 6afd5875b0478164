"""bnjax for Flax NNX, where an NNX user looks for it:

    from bnjax.nnx import BatchNorm, update_bn, checkup

    self.norm = BatchNorm(64, momentum=0.9, running_average="cumulative", rngs=rngs)  # for nnx.BatchNorm
    update_bn(model, batches)                                  # precise BN, written into the model
    print(checkup(model, train_batches, eval_batches, bnjax.accuracy))

`BatchNorm` is `flax.nnx.BatchNorm` with bnjax's variants one keyword away;
`update_bn` and `checkup` are the linen front door's for an NNX model.
"""

from bnjax.bn.checkup import Checkup, accuracy
from bnjax.bn.nnx import BatchNorm, checkup, update_bn

__all__ = ["BatchNorm", "update_bn", "checkup", "Checkup", "accuracy"]
