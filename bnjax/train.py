"""Training and evaluation of the article's nets: config, state, steps, loop.

Where BN state moves:
  * `train_step`: `apply(..., train=True, mutable=["batch_stats"])` returns the
    logits *and* the updated running statistics, which go into the new state.
  * `eval_step`: `apply(..., train=False)` with nothing mutable: running
    statistics are read, never written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from bnjax.checkpoint import restore_checkpoint, save_checkpoint
from bnjax.models import ACTIVATIONS, BN_POSITIONS, KERNEL_INITS, MLP, ConvNet
from bnjax.strategy import default_strategy

OPTIMIZERS = ("adam", "sgd")
MODELS = ("convnet", "mlp")  # the article's CNN; the BN paper's 3 x 100 MLP


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults reproduce the article: Keras 2.0.8's Adam,
    batch 32, 3 epochs of one pass (1875 steps) each, batches in a fixed order."""

    batch_norm: bool = False
    activation: str = "relu"
    model: str = "convnet"
    learning_rate: float = 0.001
    optimizer: str = "adam"
    # Keras 2.0.8 Adam defaults. Keras adds epsilon to sqrt(v) *before* bias
    # correction, optax after it; at 1e-8 the difference is negligible.
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 32
    epochs: int = 3
    steps_per_epoch: int | None = None  # None: one pass, len(x_train) // batch_size
    seed: int = 0
    shuffle: bool = False  # False: the same fixed order every epoch, as the article
    kernel_init: str = "glorot_uniform"  # Keras's default; "lecun_normal" is Flax's
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    eval_every: int = 100  # steps between evaluations on the whole test set
    eval_batch_size: int = 1000
    max_steps: int | None = None  # cap on total steps (smoke runs)
    # Data parallelism: the batch is split over this many devices (None: all).
    num_devices: int | None = None
    # False: BN statistics of the global batch (synchronized across devices).
    # True: "ghost BN", each device normalizes with the statistics of its own
    # slice of the batch: a different algorithm, not an approximation.
    ghost_bn: bool = False
    # Ablations (convnet only): BN "before" or "after" the activation, and
    # whether Conv/Dense keep their bias under BN (the article drops it).
    bn_position: str = "before"
    bn_use_bias: bool = False

    def __post_init__(self):
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("kernel_init", self.kernel_init, KERNEL_INITS)
        _check_choice("bn_position", self.bn_position, BN_POSITIONS)
        if self.model != "convnet" and (self.bn_position != "before" or self.bn_use_bias):
            raise ValueError(f"bn_position and bn_use_bias apply to model 'convnet' only, not {self.model!r}")
        for name in ("batch_norm", "shuffle", "ghost_bn", "bn_use_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("batch_size", "epochs", "eval_every", "eval_batch_size", "steps_per_epoch", "max_steps",
                     "num_devices"):
            value = getattr(self, name)
            optional = name in ("steps_per_epoch", "max_steps", "num_devices")
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                allowed = "a positive integer" + (" or None" if optional else "")
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("learning_rate", "adam_eps", "bn_epsilon"):
            _check_positive_float(name, getattr(self, name))
        for name in ("adam_b1", "adam_b2", "bn_momentum"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_float(name: str, value) -> None:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(sorted(allowed))}")


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state, apply_fn, tx) plus BN's
    running statistics. `batch_stats` is None for the plain net."""

    batch_stats: Any = None


@dataclasses.dataclass
class History:
    """Curves of one run; index i of every list belongs to `steps[i]`."""

    steps: list[int] = dataclasses.field(default_factory=list)
    val_accuracy: list[float] = dataclasses.field(default_factory=list)  # whole test set
    val_loss: list[float] = dataclasses.field(default_factory=list)
    train_accuracy: list[float] = dataclasses.field(default_factory=list)  # mean since previous evaluation
    train_loss: list[float] = dataclasses.field(default_factory=list)
    wall_time_s: list[float] = dataclasses.field(default_factory=list)  # since the first step, compile included
    total_wall_time_s: float = 0.0
    eval_time_s: float = 0.0
    diverged: bool = False
    probes: list[dict] = dataclasses.field(default_factory=list)  # `probe(state)` at each evaluation, if given

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DATA_AXIS = "data"  # the mesh axis the batch is split along


def make_model(config: TrainConfig, num_devices: int = 1) -> ConvNet | MLP:
    """The config's net. Over several devices with synchronized BN, every BN
    averages its statistics over DATA_AXIS: the statistics of the global batch."""
    common = dict(
        batch_norm=config.batch_norm,
        activation=config.activation,
        kernel_init=config.kernel_init,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
        bn_axis_name=DATA_AXIS if num_devices > 1 and not config.ghost_bn else None,
    )
    if config.model == "mlp":
        return MLP(**common)
    return ConvNet(**common, bn_position=config.bn_position, bn_use_bias=config.bn_use_bias)


def make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    """A 1-D mesh over the devices the config asks for; checks the batch divides over them."""
    available = jax.devices()
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
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    return optax.sgd(config.learning_rate)


def create_train_state(config: TrainConfig, rng: jax.Array, num_devices: int = 1) -> TrainState:
    """Fresh parameters, BN statistics and optimizer state. The result is the
    same for any `num_devices`; only how BN will average its statistics differs."""
    model = make_model(config, num_devices)
    variables = model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=make_optimizer(config),
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


def data_parallel_step(mesh: jax.sharding.Mesh, ghost_bn: bool = False):
    """`train_step_body` mapped over `mesh`: state replicated, batch split along
    its first axis, one program per device, collectives over DATA_AXIS."""
    return jax.shard_map(
        functools.partial(train_step_body, axis_name=DATA_AXIS, ghost_bn=ghost_bn),
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(), P()),
    )


# One device, no collectives: the step the tour and the tests call directly.
train_step = jax.jit(train_step_body, static_argnames=("axis_name", "ghost_bn"))


def _eval_totals(state: TrainState, images, labels):
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    logits = state.apply_fn(variables, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss_sum": losses.sum(), "correct": jnp.sum(jnp.argmax(logits, -1) == labels)}


@functools.partial(jax.jit, static_argnames=("chunk",))
def eval_step(state: TrainState, images, labels, chunk: int | None = None):
    """Summed loss and number correct on a batch, in eval mode (nothing mutable).

    With `chunk` (dividing the batch size), the batch goes through the net as a
    `lax.map` over pieces of `chunk` images, in one dispatch. Eval mode treats
    every example alone, so only the loss sum's float round-off can differ; on
    XLA:CPU pieces of ~200 images stay in cache and run ~1.7x faster than 1000
    at once (README, "Performance").
    """
    batch = labels.shape[0]
    if chunk is None or chunk >= batch or batch % chunk:
        return _eval_totals(state, images, labels)
    pieces = (images.reshape(batch // chunk, chunk, *images.shape[1:]), labels.reshape(batch // chunk, chunk))
    totals = jax.lax.map(lambda piece: _eval_totals(state, *piece), pieces)
    return jax.tree_util.tree_map(lambda per_piece: per_piece.sum(0), totals)


def _step_on_device_data(state, metric_sums, train_images, train_labels, epoch_order, first, batch_size, mesh,
                         ghost_bn):
    """Gather batch `epoch_order[first:first + batch_size]` from the device-resident
    training set, take one data-parallel step over `mesh`, and add its metrics
    to the running sums. The same step body for 1 device or many."""
    batch_indices = jax.lax.dynamic_slice(epoch_order, (first,), (batch_size,))
    images, labels = to_float_images(train_images[batch_indices]), train_labels[batch_indices]
    if mesh.size == 1:  # the same step without collectives
        state, metrics = train_step_body(state, images, labels)
    else:
        state, metrics = data_parallel_step(mesh, ghost_bn)(state, images, labels)
    return state, jax.tree_util.tree_map(jnp.add, metric_sums, metrics)


# One step per dispatch.
_train_step_on_device_data = functools.partial(
    jax.jit, static_argnames=("batch_size", "mesh", "ghost_bn"), donate_argnames=("state", "metric_sums")
)(_step_on_device_data)


@functools.partial(jax.jit, static_argnames=("length", "steps_per_epoch", "batch_size", "mesh", "ghost_bn", "unroll"),
                   donate_argnames=("state", "metric_sums"))
def _train_chunk_on_device_data(state, metric_sums, train_images, train_labels, epoch_orders, first_step, length,
                                steps_per_epoch, batch_size, mesh, ghost_bn, unroll):
    """`length` consecutive steps from global step `first_step`, in one dispatch
    (a `lax.scan`). `epoch_orders` is (epochs, N): the order of every epoch, so
    a chunk may cross an epoch boundary. Each step is `_step_on_device_data`."""

    def one_step(carry, offset):
        step = first_step + offset
        epoch, step_in_epoch = step // steps_per_epoch, step % steps_per_epoch
        carry = _step_on_device_data(*carry, train_images, train_labels, epoch_orders[epoch],
                                     step_in_epoch * batch_size, batch_size, mesh, ghost_bn)
        return carry, None

    (state, metric_sums), _ = jax.lax.scan(one_step, (state, metric_sums), jnp.arange(length), unroll=unroll)
    return state, metric_sums


def evaluate(state: TrainState, images_uint8, labels, batch_size: int = 1000, mesh=None,
             chunk: int | None = None) -> dict[str, float]:
    """Mean loss and accuracy over a whole (device-resident) set, in eval mode.
    With a `mesh`, each batch is split over its devices (eval is per example,
    so no statistics need to cross devices). `chunk`: see `eval_step` (one
    device only)."""
    loss_sum, correct = 0.0, 0
    split = NamedSharding(mesh, P(DATA_AXIS)) if mesh is not None and mesh.size > 1 else None
    for first in range(0, len(labels), batch_size):
        batch = slice(first, first + batch_size)
        images, batch_labels = to_float_images(images_uint8[batch]), labels[batch]
        if split is not None and len(batch_labels) % mesh.size == 0:
            images, batch_labels = jax.device_put((images, batch_labels), split)
            totals = eval_step(state, images, batch_labels)
        else:
            totals = eval_step(state, images, batch_labels, chunk=chunk)
        loss_sum, correct = loss_sum + totals["loss_sum"], correct + totals["correct"]
    return {"loss": float(loss_sum) / len(labels), "accuracy": float(correct) / len(labels)}


def epoch_order(config: TrainConfig, epoch: int, num_examples: int) -> np.ndarray:
    """Indices of the training set in the order one epoch visits them."""
    if not config.shuffle:
        return np.arange(num_examples, dtype=np.int32)
    rng = np.random.default_rng([config.seed, epoch])
    return rng.permutation(num_examples).astype(np.int32)


def resolve_steps(config: TrainConfig, num_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) for a training set of `num_examples`."""
    one_pass = num_examples // config.batch_size
    if one_pass < 1:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({num_examples} examples)")
    steps_per_epoch = config.steps_per_epoch or one_pass
    if steps_per_epoch > one_pass:
        raise ValueError(
            f"steps_per_epoch {steps_per_epoch} needs {steps_per_epoch * config.batch_size} examples per epoch; "
            f"the training set has {num_examples} (at most {one_pass} steps of {config.batch_size})"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return steps_per_epoch, total_steps


EvalCallback = Callable[[int, int, dict], None]


def check_dataset(data) -> None:
    """Raise a ValueError naming the problem unless `data` holds (N, H, W, C)
    uint8 images and (N,) integer labels in 0..9 for both splits."""
    for split in ("train", "test"):
        images, labels = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"x_{split} must be (N, height, width, channels) uint8, got {images.shape} {images.dtype}")
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"y_{split} must be ({images.shape[0]},) integers, got {labels.shape} {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"y_{split} must hold class indices 0..9, got values {labels.min()}..{labels.max()}")


def train(
    config: TrainConfig,
    data,
    on_eval: EvalCallback | None = None,
    checkpoint_path: str | None = None,
    probe: Callable[[TrainState], dict] | None = None,
    strategy=None,
) -> tuple[History, TrainState]:
    """Train one model on `data` (a `bnjax.data.Dataset`) and evaluate it on the
    test set every `config.eval_every` steps and at the end.

    `on_eval(step, total_steps, record)` is called after each evaluation (for
    progress output). Returns (history, final_state). A run whose training loss
    becomes NaN or infinite stops there and is marked `diverged`.

    With `checkpoint_path`, the whole run (state, history, config) is saved
    there after every evaluation, and a run started with an existing checkpoint
    resumes from it: an interrupted run reaches the same History as an
    uninterrupted one.

    `probe(state) -> dict of floats`, if given, is measured at every evaluation
    and kept in `history.probes` (e.g. percentiles of a unit's input).

    `strategy` (a `bnjax.strategy.Strategy`; default: the fastest known for the
    backend, `bnjax.strategy.default_strategy`) sets how many steps run per
    dispatch and the pieces each test batch is evaluated in. It never changes
    what is computed, only how it is launched (tests/test_engine.py holds
    every strategy to the per-step results).
    """

    check_dataset(data)
    steps_per_epoch, total_steps = resolve_steps(config, len(data.x_train))
    mesh = make_mesh(config)
    strategy = strategy or default_strategy(mesh.devices.flat[0].platform)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(create_train_state(config, jax.random.key(config.seed), mesh.size), replicated)

    # The whole data set goes to every device once, as uint8 (47 MB for MNIST);
    # batches are gathered and converted to float there, then split over devices.
    train_images, train_labels, test_images, test_labels = jax.device_put(tuple(data), replicated)
    # XLA:CPU runs several CPU devices' programs on one shared thread pool; with
    # hundreds of multi-device steps queued by asynchronous dispatch, some
    # devices can wait in one step's all-reduce while the others cannot get
    # threads, and XLA aborts after 40 s (seen with 8 simulated devices on 2
    # cores at 300 queued steps, never when each step is awaited). So on CPU
    # meshes each step is awaited; GPUs and TPUs keep dispatching ahead.
    await_each_step = mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
    steps_per_dispatch = 1 if await_each_step else strategy.steps_per_dispatch
    if steps_per_dispatch > 1:
        epoch_orders = jax.device_put(np.stack([epoch_order(config, epoch, len(data.x_train))
                                                for epoch in range(config.epochs)]), replicated)

    history = History()
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        state, saved_history = restore_checkpoint(checkpoint_path, state, config)
        state = jax.device_put(state, replicated)
        history = History(**saved_history)
    zero_sums = lambda: {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
    metric_sums, steps_in_sums = zero_sums(), 0
    start_time = time.perf_counter() - history.total_wall_time_s
    step, order_epoch = int(state.step), None
    while step < total_steps and not history.diverged:
        if steps_per_dispatch > 1:  # up to the next evaluation, in chunks
            next_eval = min(total_steps, (step // config.eval_every + 1) * config.eval_every)
            length = min(steps_per_dispatch, next_eval - step)
            state, metric_sums = _train_chunk_on_device_data(
                state, metric_sums, train_images, train_labels, epoch_orders, step, length=length,
                steps_per_epoch=steps_per_epoch, batch_size=config.batch_size, mesh=mesh, ghost_bn=config.ghost_bn,
                unroll=strategy.unroll,
            )
            step += length
            steps_in_sums += length
        else:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = jax.device_put(epoch_order(config, epoch, len(data.x_train)), replicated)
                order_epoch = epoch
            state, metric_sums = _train_step_on_device_data(
                state, metric_sums, train_images, train_labels, order,
                step_in_epoch * config.batch_size, batch_size=config.batch_size, mesh=mesh, ghost_bn=config.ghost_bn,
            )
            if await_each_step:
                jax.block_until_ready(state)
            step += 1
            steps_in_sums += 1
        if step % config.eval_every and step != total_steps:
            continue

        # Reading the sums waits for the queued train steps, so it comes before
        # the evaluation clock starts.
        train_accuracy = float(metric_sums["accuracy"]) / steps_in_sums
        train_loss = float(metric_sums["loss"]) / steps_in_sums
        eval_start = time.perf_counter()
        val = evaluate(state, test_images, test_labels, config.eval_batch_size, mesh, strategy.eval_chunk)
        history.eval_time_s += time.perf_counter() - eval_start
        record = {
            "steps": step,
            "val_accuracy": val["accuracy"],
            "val_loss": val["loss"],
            "train_accuracy": train_accuracy,
            "train_loss": train_loss,
            "wall_time_s": time.perf_counter() - start_time,
        }
        for key, value in record.items():
            getattr(history, key).append(value)
        if probe is not None:
            history.probes.append(probe(state))
        history.diverged = not math.isfinite(record["train_loss"])
        history.total_wall_time_s = time.perf_counter() - start_time
        metric_sums, steps_in_sums = zero_sums(), 0
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, state, history, config)
        if on_eval is not None:
            on_eval(step, total_steps, record)
    history.total_wall_time_s = time.perf_counter() - start_time
    return history, state
