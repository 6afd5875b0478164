"""Recurrent Batch Normalization: the BN-LSTM of Cooijmans, Ballas, Laurent,
Gulcehre & Courville (arXiv 1603.09025, ICLR 2017) and the plain LSTM it is
compared with, reading an MNIST image as a sequence.

The BN-LSTM at time step t (the paper's equations 6-8):

    (f~, i~, o~, g~) = BN(W_h h_{t-1}; gamma_h) + BN(W_x x_t; gamma_x) + b
    c_t = sigmoid(f~) * c_{t-1} + sigmoid(i~) * tanh(g~)
    h_t = sigmoid(o~) * tanh(BN(c_t; gamma_c, beta_c))

The recurrent and the input term are normalized separately, with no shift
(b carries it); the plain LSTM is the same without the three BNs. Every
gamma starts at 0.1, not 1 (`bn_scale_init`): at unit variance tanh and
sigmoid saturate and the gradient dies within a few steps back in time
(the paper's section 4; the recurrent-BN study measures it).

BN state, one set per time step. Each BN keeps population statistics for
every step t = 1 .. T_max, as rows of `batch_stats`:

    bn_hidden/mean, bn_hidden/var    (T_max, 4H)   of W_h h_{t-1}
    bn_input/mean,  bn_input/var     (T_max, 4H)   of W_x x_t
    bn_cell/mean,   bn_cell/var      (T_max, H)    of c_t

Train mode normalizes step t by the batch's statistics *at step t* and moves
row t, and only row t, toward them, by the rule `bn.running_average` of
`BatchNorm` (an update `count` per BN where the rule needs it).
Eval mode normalizes step t by row t, and every step beyond T_max by row
T_max (the paper's rule for sequences longer than any seen in training).
Each example is then alone: nothing is mutated. Precise BN
(`precise_statistics`) re-estimates every row for the current weights.

The sequences (`SEQUENCES`): "pixels", one pixel per step, left to right,
top to bottom (784 steps, the paper's task); "permuted_pixels", the same
pixels in one fixed random order drawn from `permutation_seed` (the paper's
pMNIST); "rows", one row of 28 pixels per step (28 steps: fits a 2-core CPU).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.bn.batchnorm import KERAS_MOMENTUM, BatchNorm, keras_bn, batch_statistics, normalize, running_average_weights
from bnjax.nets.models import bn_of, get_activation
from bnjax.support.checks import check_choice, is_integer

SEQUENCES = {"rows": (28, 28), "pixels": (784, 1), "permuted_pixels": (784, 1)}  # (steps, values per step)
BN_LAYERS = ("bn_hidden", "bn_input", "bn_cell")



def paper_settings(batch_norm: bool) -> dict:
    """The paper's sequential-MNIST settings, as `TrainConfig` fields (section
    5.1; where the text is silent, its code: github.com/cooijmanstim/recurrent-
    batch-normalization, sequential_mnist.py and experiments/sequential*mnist_*.sh):
    100 hidden units, RMSProp with learning rate 1e-3 and decay 0.9 (the text
    calls it momentum), gradient norm clipped at 1, batches of 100, and with
    BN epsilon 1e-5, gamma 0.1, variances in two passes as Theano's `var`.
    `TrainConfig(**paper_settings(batch_norm=True), sequence="pixels")` is
    the paper's BN-LSTM on MNIST.

    Args:
      batch_norm: the BN-LSTM (True) or the plain LSTM (False).
    Returns:
      A dict of TrainConfig fields.
    """
    settings = dict(model="lstm", activation="tanh", optimizer="rmsprop", learning_rate=1e-3, rmsprop_decay=0.9,
                    grad_clip_norm=1.0, batch_size=100, lstm_hidden_size=100, lstm_bn_scale_init=0.1,
                    batch_norm=batch_norm)
    if batch_norm:
        settings["bn"] = keras_bn(epsilon=1e-5, use_fast_variance=False)
    return settings


# The fields of a run (`TrainConfig`) that model "lstm" takes at their defaults
# only: it has its own initializers, one device's per-step statistics and
# float32 arithmetic. And the fields of model "lstm" alone.
FIXED_FOR_LSTM = ("kernel_init", "ghost_bn", "compute_dtype")
LSTM_FIELDS = ("sequence", "lstm_hidden_size", "lstm_t_max", "lstm_bn_scale_init", "permutation_seed")


def check_lstm_bn(bn: BatchNorm) -> None:
    """The BN settings the BN-LSTM's per-step BN takes (momentum, epsilon,
    running_average, use_fast_variance): Batch Renorm, frozen BN, ghost
    batches, PyTorch's unbiased running variance and noisy BN are not
    variants of it. One-line ValueError otherwise."""
    if type(bn) is not BatchNorm:
        raise ValueError(f"the BN-LSTM's per-step BN is a plain BatchNorm, got {type(bn).__name__}")
    defaults = {field.name: field.default for field in dataclasses.fields(BatchNorm)}
    for name in ("renorm", "frozen", "ghost_batch_size", "unbiased_running_var"):
        if getattr(bn, name) != defaults[name]:
            raise ValueError(f"the BN-LSTM's per-step BN takes {name}={defaults[name]!r} only, "
                             f"got {getattr(bn, name)!r}")


def check_lstm_settings(run, defaults: dict) -> None:
    """A run's settings against the LSTM's rules: with model "lstm",
    FIXED_FOR_LSTM at their `defaults`, its BN `check_lstm_bn`'s and
    lstm_t_max within the sequence; with any other model, LSTM_FIELDS at
    their defaults. `run` is a TrainConfig. One-line ValueError otherwise."""
    if run.model != "lstm":
        if any(getattr(run, name) != defaults[name] for name in LSTM_FIELDS):
            raise ValueError(f"sequence and the lstm_ fields apply to model 'lstm' only, not {run.model!r}")
        return
    for name in FIXED_FOR_LSTM:
        if getattr(run, name) != defaults[name]:
            raise ValueError(f"model 'lstm' takes {name}={defaults[name]!r} only, got {getattr(run, name)!r}")
    if run.bn is not None:
        check_lstm_bn(run.bn)
    steps = sequence_length(run.sequence)
    if run.lstm_t_max is not None and (not is_integer(run.lstm_t_max) or not 1 <= run.lstm_t_max <= steps):
        raise ValueError(f"lstm_t_max must be None or an integer from 1 to the {run.sequence!r} sequence's "
                         f"{steps} steps, got {run.lstm_t_max!r}")


def sequence_length(sequence: str) -> int:
    check_sequence(sequence)
    return SEQUENCES[sequence][0]


def check_sequence(sequence: str) -> None:
    check_choice("sequence", sequence, SEQUENCES)


def pixel_permutation(seed: int) -> np.ndarray:
    """The fixed order of the 784 pixels in "permuted_pixels"."""
    return np.random.default_rng(seed).permutation(28 * 28)


def image_sequences(images, sequence: str, permutation_seed: int = 0):
    """(N, 28, 28, 1) or (N, 28, 28) images -> (N, steps, values per step)."""
    check_sequence(sequence)
    if images.size // max(images.shape[0], 1) != 28 * 28 or images.ndim < 3:
        raise ValueError(f"the LSTM reads 28 x 28 MNIST images, got an array of shape {tuple(images.shape)}")
    steps, width = SEQUENCES[sequence]
    x = images.reshape(images.shape[0], steps, width)
    if sequence == "permuted_pixels":
        x = x[:, pixel_permutation(permutation_seed), :]
    return x


def hidden_kernel_init(key, shape, dtype=jnp.float32):
    """W_h (H, 4H) in gate order f, i, o, g: orthogonal blocks for the three
    gates, the identity for g (the paper: "the identity matrix ... yields better
    generalization performance on this task for both models")."""
    hidden = shape[0]
    gates = nn.initializers.orthogonal()(key, (hidden, 3 * hidden), dtype)
    return jnp.concatenate([gates, jnp.eye(hidden, dtype=dtype)], axis=1)


def gate_bias_init(key, shape, dtype=jnp.float32):
    """b (4H): 1 for the forget gate, 0 elsewhere (the paper's code)."""
    return jnp.zeros(shape, dtype).at[: shape[0] // 4].set(1.0)


def step_rows(steps: int, t_max: int):
    """The row of the per-step statistics each of `steps` steps uses: t, or
    T_max's for every step beyond it."""
    return jnp.minimum(jnp.arange(steps), t_max - 1)


class StepStatistics(nn.Module):
    """The population statistics of one BN of the cell, a row per time step,
    and how they move: `update` folds in the batch statistics of every step."""

    t_max: int
    features: int
    running_average: str = "ema"
    momentum: float = KERAS_MOMENTUM

    def setup(self):
        self.mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.t_max, self.features), jnp.float32))
        self.var = self.variable("batch_stats", "var", lambda: jnp.ones((self.t_max, self.features), jnp.float32))
        if self.running_average != "ema":  # the rules that weigh the t-th update by t
            self.count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

    def rows(self, steps: int):
        """Each of `steps` steps' (mean, var): row t, or row T_max beyond it."""
        rows = step_rows(steps, self.t_max)
        return self.mean.value[rows], self.var.value[rows]

    def update(self, batch_mean, batch_var):
        """Rows 1 .. min(steps, T_max) move toward those steps' batch statistics
        ((steps, features) each); steps beyond T_max are not recorded."""
        recorded = min(batch_mean.shape[0], self.t_max)
        count = None
        if self.running_average != "ema":
            count = self.count.value = self.count.value + 1
        keep, take = running_average_weights(self.running_average, self.momentum, count)
        for variable, batch_value in ((self.mean, batch_mean), (self.var, batch_var)):
            moved = keep * variable.value[:recorded] + take * batch_value[:recorded]
            variable.value = variable.value.at[:recorded].set(moved)


def bn_at_step(settings, train: bool, z, population_t, scale, bias):
    """BN of `z` at one time step: by the batch's statistics in train mode
    (returned, to update row t), by row t's (`population_t`: mean, var) in
    eval mode. `settings`: the BatchNorm whose epsilon, axis_name and
    variance rule apply."""
    mean, var = (batch_statistics(z, settings.axis_name, use_fast_variance=settings.use_fast_variance) if train
                 else population_t)
    return normalize(z, mean, var, scale, bias, settings.epsilon), (mean, var)


class LSTM(nn.Module):
    """LSTM (`batch_norm=False`) or BN-LSTM over an MNIST image read as a
    `sequence`, with a 10-way Dense on the last hidden state.
    `model.apply(variables, images, train=...)`: (N, 28, 28, 1) floats in, (N, 10)
    logits out. `hidden_offsets` (N, steps, H), if given, is added to each h_t:
    its gradient is the loss's gradient with respect to every hidden state."""

    batch_norm: bool = False
    sequence: str = "rows"
    hidden_size: int = 100
    t_max: int | None = None  # rows of per-step statistics; None: the sequence's length
    bn_scale_init: float = 0.1
    permutation_seed: int = 0
    activation: str = "tanh"
    # BN's settings as one value, as the other nets take them. The per-step BN
    # uses its momentum, epsilon, axis_name, running_average and
    # use_fast_variance; Batch Renorm, frozen BN, ghost batches and PyTorch's
    # unbiased running variance are not variants of it. None: Keras's (`keras_bn`).
    bn: BatchNorm | None = None

    def __post_init__(self):
        if self.bn is not None:
            check_lstm_bn(self.bn)
        super().__post_init__()

    @nn.compact
    def __call__(self, images, *, train: bool, hidden_offsets=None):
        activation = get_activation(self.activation)
        bn_settings = bn_of(self)
        x = image_sequences(images, self.sequence, self.permutation_seed)  # (N, T, D)
        examples, steps, width = x.shape
        hidden = self.hidden_size
        t_max = self.t_max or steps

        input_kernel = self.param("input_kernel", nn.initializers.orthogonal(), (width, 4 * hidden))
        hidden_kernel = self.param("hidden_kernel", hidden_kernel_init, (hidden, 4 * hidden))
        bias = self.param("bias", gate_bias_init, (4 * hidden,))
        # h_0 and c_0 are learned; each example's h_0 also gets its mean pixel
        # (the paper's code, for both models): with h_0 alike for all examples
        # and the first rows black, W_h h has no variance over the batch and
        # BN's 1 / sqrt(var + eps) makes the gradient explode.
        h = self.param("initial_hidden", nn.initializers.zeros, (hidden,)) + x.mean(axis=(1, 2))[:, None]
        c = jnp.broadcast_to(self.param("initial_cell", nn.initializers.zeros, (hidden,)), (examples, hidden))

        if self.batch_norm:
            scale = nn.initializers.constant(self.bn_scale_init)
            hidden_scale = self.param("hidden_scale", scale, (4 * hidden,))
            input_scale = self.param("input_scale", scale, (4 * hidden,))
            cell_scale = self.param("cell_scale", scale, (hidden,))
            cell_bias = self.param("cell_bias", nn.initializers.zeros, (hidden,))
            running = {name: StepStatistics(t_max, features, bn_settings.running_average, bn_settings.momentum,
                                             name=name)
                       for name, features in zip(BN_LAYERS, (4 * hidden, 4 * hidden, hidden))}
            # Eval mode: step t's population statistics, fed to the scan step by step.
            population = {name: statistics.rows(steps) for name, statistics in running.items()}

        def bn(name, z, population_t, scale, bias):
            return bn_at_step(bn_settings, train, z, population_t[name] if not train else None, scale, bias)

        def cell(carry, step):
            h, c = carry
            x_t, offset_t, population_t = step
            hidden_term, input_term = h @ hidden_kernel, x_t @ input_kernel
            if self.batch_norm:
                hidden_term, hidden_stats = bn("bn_hidden", hidden_term, population_t, hidden_scale, 0.0)
                input_term, input_stats = bn("bn_input", input_term, population_t, input_scale, 0.0)
            forget, input_gate, output, candidate = jnp.split(hidden_term + input_term + bias, 4, axis=-1)
            c = nn.sigmoid(forget) * c + nn.sigmoid(input_gate) * activation(candidate)
            cell_out, statistics = c, None
            if self.batch_norm:
                cell_out, cell_stats = bn("bn_cell", c, population_t, cell_scale, cell_bias)
                if train:  # each step's batch statistics, for the running ones
                    statistics = {"bn_hidden": hidden_stats, "bn_input": input_stats, "bn_cell": cell_stats}
            h = nn.sigmoid(output) * activation(cell_out)
            if offset_t is not None:
                h = h + offset_t
            return (h, c), statistics

        time_major = (jnp.swapaxes(x, 0, 1), None if hidden_offsets is None else jnp.swapaxes(hidden_offsets, 0, 1),
                      population if self.batch_norm else None)
        (h, _), statistics = jax.lax.scan(cell, (h, c), time_major)

        if self.batch_norm and train and not self.is_initializing():
            for name, step_statistics in running.items():
                step_statistics.update(*statistics[name])  # (T, features) means and variances
        return nn.Dense(10, kernel_init=nn.initializers.orthogonal(), name="output")(h)
