"""The train step and the eval step, and what they act on: the
model, its `TrainState`, the optimizer and the device mesh.

Where BN state moves:
  * `train_step`: `apply(..., train=True, mutable=["batch_stats"])` returns the
    logits *and* the updated running statistics, which go into the new state.
  * `eval_step`: `apply(..., train=False)` with nothing mutable: running
    statistics are read, never written.

Everything else (several runs at once, several steps per dispatch, a mesh)
is built around `train_step_body` by the engine's loop (`train_runs`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

from bnjax.nets.models import MLP, ConvNet
from bnjax.nets.recurrent import LSTM
from bnjax.training.config import TrainConfig

class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state, apply_fn, tx) plus BN's
    running statistics. `batch_stats` is None for the plain net."""

    batch_stats: Any = None


DATA_AXIS = "data"  # the mesh axis the batch is split along


def make_model(config: TrainConfig, num_devices: int = 1, conv_implementation: str = "lax") -> ConvNet | MLP | LSTM:
    """The config's net. Over several devices with synchronized BN, every BN
    averages its statistics over DATA_AXIS: the statistics of the global batch.
    `conv_implementation` ("lax" or "matmul": `conv_as_matmul`) applies to the CNN's convolutions."""
    bn = config.bn_layer(axis_name=DATA_AXIS if num_devices > 1 and not config.ghost_bn else None)
    if config.model == "lstm":
        return LSTM(batch_norm=config.batch_norm, bn=bn, sequence=config.sequence,
                    hidden_size=config.lstm_hidden_size, t_max=config.lstm_t_max,
                    bn_scale_init=config.lstm_bn_scale_init, permutation_seed=config.permutation_seed,
                    activation=config.activation)
    common = dict(batch_norm=config.batch_norm, bn=bn, activation=config.activation, kernel_init=config.kernel_init,
                  dtype=None if config.compute_dtype == "float32" else getattr(jnp, config.compute_dtype))
    if config.model == "mlp":
        return MLP(**common)
    return ConvNet(**common, bn_position=config.bn_position, bn_use_bias=config.bn_use_bias,
                   conv_implementation=conv_implementation)


def matmul_precision(config: TrainConfig):
    """The context in which the config's programs are traced: JAX's matmul
    precision for float32 convolutions and matrix products (part of jit's cache key)."""
    return jax.default_matmul_precision(config.matmul_precision)


# A TrainState holds its model's apply and its optimizer as static fields,
# which jax compares when it stacks runs (one pytree structure) and when jit
# looks for a compiled step. A bound method and an optax transformation
# compare by identity; these two compare by the settings they are made of,
# so every run of one setting has one structure and reuses one program.

@dataclasses.dataclass(frozen=True)
class ModelApply:
    """`model.apply`, equal for equal models (flax modules compare by their fields)."""

    model: nn.Module

    def __call__(self, *args, **kwargs):
        return self.model.apply(*args, **kwargs)


OPTIMIZER_FIELDS = ("optimizer", "adam_b1", "adam_b2", "adam_eps", "rmsprop_decay", "grad_clip_norm")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimizer of every run with these settings (OPTIMIZER_FIELDS, as
    (name, value) pairs), whatever its learning rate: `inject_hyperparams`
    reads the learning rate from each run's optimizer state (set by
    `create_train_state`), never from this object. An optax
    GradientTransformation's `init` and `update`."""

    settings: tuple

    @functools.cached_property
    def _transformation(self) -> optax.GradientTransformation:
        return make_optimizer(TrainConfig(**dict(self.settings)))

    def init(self, params):
        return self._transformation.init(params)

    def update(self, updates, state, params=None):
        return self._transformation.update(updates, state, params)


def make_mesh(config: TrainConfig, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over the devices the config asks for (the first of `devices`,
    default `jax.devices()`); checks the batch divides over them."""
    available = jax.devices() if devices is None else list(devices)
    num_devices = config.num_devices or len(available)
    if num_devices > len(available):
        raise ValueError(f"num_devices {num_devices} asked for, but only {len(available)} devices are visible: "
                         f"{', '.join(str(device) for device in available[:4])}{' ...' if len(available) > 4 else ''}")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % num_devices:
            raise ValueError(f"{name} {getattr(config, name)} does not divide evenly over {num_devices} devices; "
                             f"use a multiple of {num_devices}")
    return jax.sharding.Mesh(np.array(available[:num_devices]), (DATA_AXIS,))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The config's optimizer, with its learning rate kept in the optimizer
    state (`optax.inject_hyperparams`) rather than in the function: runs that
    differ only in learning rate then share one program (`program_key`).
    Adam's betas and epsilon stay constants of the function (`static_args`):
    injected as traced values too, they would change XLA's float32 round-off
    of every step."""
    if config.optimizer == "adam":
        optimizer = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps"))(
            learning_rate=config.learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    elif config.optimizer == "rmsprop":
        optimizer = optax.inject_hyperparams(optax.rmsprop, static_args=("decay",))(
            learning_rate=config.learning_rate, decay=config.rmsprop_decay)
    else:
        optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate)
    if config.grad_clip_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)


@functools.partial(jax.jit, static_argnames="model")
def _initial_variables(model, rng):
    """`model.init` as one compiled program (eagerly it is ~100 programs of
    one operation each, every one compiled on first use); the same numbers."""
    return model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)


def create_train_state(config: TrainConfig, rng: jax.Array, num_devices: int = 1,
                       conv_implementation: str = "lax") -> TrainState:
    """Fresh parameters, BN statistics and optimizer state. The result is the
    same for any `num_devices` and `conv_implementation`; only how BN will
    average its statistics and how the convolutions are computed differ."""
    model = make_model(config, num_devices, conv_implementation)
    variables = _initial_variables(model, rng)
    params = variables["params"]
    return TrainState(
        step=0,
        apply_fn=ModelApply(model),
        params=params,
        tx=Optimizer(tuple((name, getattr(config, name)) for name in OPTIMIZER_FIELDS)),
        opt_state=make_optimizer(config).init(params),  # holds this run's learning rate
        batch_stats=variables.get("batch_stats"),
    )


def to_float_images(images_uint8):
    """(N, 28, 28, 1) uint8 -> float32 in [0, 1], as the article's x / 255."""
    return images_uint8.astype(jnp.float32) / 255.0


def cross_entropy_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step_body(state: TrainState, images, labels, axis_name: str | None = None, ghost_bn: bool = False):
    """One optimizer step on a batch of float images. Returns (new_state, metrics).

    Inside `shard_map` over `axis_name`, `images` is this device's slice of the
    global batch: gradients and metrics are averaged over devices, which (with
    equal slices) gives those of the global batch. BN statistics were already
    synchronized inside `BatchNorm`, except under ghost BN, where each device's
    running statistics are averaged here so that all devices keep one state.
    """

    def loss_fn(params):
        if state.batch_stats is None:
            logits = state.apply_fn({"params": params}, images, train=True)
            new_batch_stats = None
        else:
            # Train mode: normalize with this batch's statistics, and get the
            # updated running averages back as a value.
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            new_batch_stats = updates["batch_stats"]
        return cross_entropy_loss(logits, labels), (logits, new_batch_stats)

    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        if ghost_bn and new_batch_stats is not None:
            new_batch_stats = jax.lax.pmean(new_batch_stats, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
    return new_state, metrics


# One device, no collectives: the step the tour and the tests call directly.
train_step = jax.jit(train_step_body, static_argnames=("axis_name", "ghost_bn"))


def model_of(state: TrainState) -> nn.Module:
    """The model a state applies: its `ModelApply`'s, or the module of a
    bound `model.apply` (a state built as flax's examples build one)."""
    apply_fn = state.apply_fn
    model = apply_fn.model if isinstance(apply_fn, ModelApply) else getattr(apply_fn, "__self__", None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"the state's apply_fn {apply_fn!r} is neither ModelApply(model) nor a module's apply")
    return model


def logits_totals(logits, labels):
    """Summed cross-entropy and number correct of a batch's logits."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss_sum": losses.sum(), "correct": jnp.sum(jnp.argmax(logits, -1) == labels)}


def _eval_totals(state: TrainState, images, labels):
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    return logits_totals(state.apply_fn(variables, images, train=False), labels)


@functools.partial(jax.jit, static_argnames=("chunk",))
def eval_step(state: TrainState, images, labels, chunk: int | None = None):
    """Summed loss and number correct on a batch, in eval mode (nothing mutable).

    With `chunk` (dividing the batch size), the batch goes through the net as a
    `lax.map` over pieces of `chunk` images, in one dispatch. Eval mode treats
    every example alone, so only the loss sum's float round-off can differ; on
    XLA:CPU pieces of ~200 images stay in cache and run faster than 1000
    at once (docs/performance.md).
    """
    batch = labels.shape[0]
    if chunk is None or chunk >= batch or batch % chunk:
        return _eval_totals(state, images, labels)
    pieces = (images.reshape(batch // chunk, chunk, *images.shape[1:]), labels.reshape(batch // chunk, chunk))
    totals = jax.lax.map(lambda piece: _eval_totals(state, *piece), pieces)
    return jax.tree_util.tree_map(lambda per_piece: per_piece.sum(0), totals)
