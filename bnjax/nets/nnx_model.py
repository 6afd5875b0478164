"""The article's BN net in Flax NNX, for reading beside the linen `ConvNet`.

NNX keeps state *inside* the module object: each BatchNorm (bnjax.nnx's,
which is flax.nnx.BatchNorm with bnjax's variants beside it) holds its
running `mean` and `var` as `nnx.BatchStat` variables. A train-mode view
(`nnx.view(model, use_running_average=False)`) normalizes with batch
statistics and updates those variables in place when called; an eval-mode
view (`use_running_average=True`) uses them. Both views share the model's
variables (`mode_view` falls back to `model.train()` / `model.eval()` where
the installed flax predates `nnx.view`, added in flax 0.12.4). Under
`jax.jit` the model crosses as `nnx.split` (a static graph definition and
its state) and `nnx.merge`; `train_mode_forward` returns the updated state,
which `nnx.update` writes back. Linen instead returns the new statistics as a
value from `apply(..., mutable=["batch_stats"])`. Same math, two styles:
`linen_to_nnx` copies a linen ConvNet's variables in, and the tests check
that both give the same logits and the same updated statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax.bn.batchnorm import KERAS_EPSILON, KERAS_MOMENTUM
from bnjax.bn.nnx import BatchNorm
from bnjax.nets.models import get_activation, max_pool_2x2


class NNXConvNet(nnx.Module):
    """Conv 32, pool, Conv 64, pool, Conv 64, Dense 64, Dense 10; every layer
    without bias and followed by BatchNorm, then the activation (not on the output)."""

    def __init__(self, activation: str = "relu", momentum: float = KERAS_MOMENTUM,
                 epsilon: float = KERAS_EPSILON, *, rngs: nnx.Rngs):
        self.activation = get_activation(activation)
        conv = lambda cin, cout: nnx.Conv(cin, cout, (3, 3), padding="VALID", use_bias=False, rngs=rngs)  # noqa: E731
        norm = lambda n: BatchNorm(n, momentum=momentum, epsilon=epsilon, rngs=rngs)  # noqa: E731
        self.convs = nnx.List([conv(1, 32), conv(32, 64), conv(64, 64)])
        self.denses = nnx.List([nnx.Linear(576, 64, use_bias=False, rngs=rngs),
                                nnx.Linear(64, 10, use_bias=False, rngs=rngs)])
        self.norms = nnx.List([norm(n) for n in (32, 64, 64, 64, 10)])

    def __call__(self, x):  # (N, 28, 28, 1) -> (N, 10) logits
        act = self.activation
        x = max_pool_2x2(act(self.norms[0](self.convs[0](x))))
        x = max_pool_2x2(act(self.norms[1](self.convs[1](x))))
        x = act(self.norms[2](self.convs[2](x))).reshape(-1, 576)
        x = act(self.norms[3](self.denses[0](x)))
        return self.norms[4](self.denses[1](x))


LINEN_LAYERS = ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1")


def linen_to_nnx(model: NNXConvNet, variables: dict) -> None:
    """Copy a linen BN ConvNet's `params` and `batch_stats` into `model`, in place."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    for layer, name in zip([*model.convs, *model.denses], LINEN_LAYERS):
        layer.kernel[...] = jnp.asarray(params[name]["kernel"])
    for index, norm in enumerate(model.norms):
        name = f"BatchNorm_{index}"
        norm.scale[...] = jnp.asarray(params[name]["scale"])
        norm.bias[...] = jnp.asarray(params[name]["bias"])
        norm.mean[...] = jnp.asarray(batch_stats[name]["mean"])
        norm.var[...] = jnp.asarray(batch_stats[name]["var"])


def nnx_batch_stats(model: NNXConvNet) -> dict:
    """The NNX model's running statistics, in linen's `batch_stats` layout."""
    return {f"BatchNorm_{i}": {"mean": norm.mean[...], "var": norm.var[...]} for i, norm in enumerate(model.norms)}


def mode_view(model: nnx.Module, train: bool) -> nnx.Module:
    """`model` in train mode (batch statistics, running averages updated) or
    eval mode (running averages used): a view sharing its variables, or, with
    a flax older than `nnx.view`, the model itself switched (so there, take
    the view right before using it)."""
    if hasattr(nnx, "view"):
        return nnx.view(model, use_running_average=not train)
    model.train() if train else model.eval()
    return model


@jax.jit
def train_mode_forward(graphdef: nnx.GraphDef, state: nnx.State, images):
    """One train-mode call of the split model `(graphdef, state)`: (logits,
    the state after it, running statistics updated)."""
    model = nnx.merge(graphdef, state)
    logits = model(images)  # every BatchNorm updates its BatchStat variables in place
    return logits, nnx.state(model)
