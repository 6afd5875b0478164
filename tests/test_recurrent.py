"""The BN-LSTM (bnjax/nets/recurrent.py): per-step statistics, eval mode, T_max,
the paper's equations unrolled by hand, gradients, a real run, bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax.bn.batchnorm import BatchNorm, Renorm
from bnjax.nets.recurrent import LSTM, image_sequences, paper_settings, pixel_permutation
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.steps import model_of
from bnjax.training.steps import create_train_state, train_step
from bnjax.training.train import train

HIDDEN = 8
MOMENTUM = 0.9


def small_lstm(two_pass_variance=False, **fields):
    bn = BatchNorm(momentum=MOMENTUM, epsilon=1e-5, use_fast_variance=not two_pass_variance)
    return LSTM(**{"batch_norm": True, "hidden_size": HIDDEN, "bn": bn, **fields})


def init(model, seed=0):
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))


def apply(model, variables, images, train, mutable=False):
    """`model.apply` as one compiled program (op by op, the scan's model takes seconds)."""
    return jax.jit(model.apply, static_argnames=("train", "mutable"))(variables, images, train=train, mutable=mutable)


def random_variables(model, seed=0):
    """The model's variables with every parameter and statistic moved off its
    initial value, so that nothing is checked at a special point (gamma 0.1,
    zero biases, mean 0 / var 1)."""
    variables = init(model, seed)
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map(
        lambda leaf: leaf + 0.1 * rng.standard_normal(leaf.shape, dtype=np.float32) if leaf.dtype == jnp.float32
        else leaf, variables)
    if "batch_stats" in variables:  # variances must stay positive
        variables["batch_stats"] = {layer: {**stats, "var": jnp.abs(stats["var"]) + 0.05}
                                    for layer, stats in variables["batch_stats"].items()}
    return variables


def scaled_rows(examples=16, seed=0):
    """Images whose row t has values of scale (t + 1): each step's statistics differ."""
    rng = np.random.default_rng(seed)
    scales = np.arange(1, 29, dtype=np.float32)[None, :, None, None]
    return jnp.asarray(rng.random((examples, 28, 28, 1), dtype=np.float32) * scales)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def paper_equations(variables, images, train, t_max=28, epsilon=1e-5):
    """The paper's equations 6-8, unrolled step by step in float64 NumPy (the
    model's rows layout, its initial state with the example's mean pixel)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables.get("batch_stats", {}))
    x = np.asarray(images, np.float64).reshape(len(images), 28, 28)
    h = p["initial_hidden"] + x.mean(axis=(1, 2))[:, None]
    c = np.broadcast_to(p["initial_cell"], h.shape)
    batch_norm = "hidden_scale" in p

    def bn(z, layer, t, scale, bias=0.0):
        if train:
            mean, var = z.mean(axis=0), z.var(axis=0)
        else:
            row = min(t, t_max - 1)
            mean, var = stats[layer]["mean"][row], stats[layer]["var"][row]
        return scale * (z - mean) / np.sqrt(var + epsilon) + bias

    for t in range(28):
        hidden_term, input_term = h @ p["hidden_kernel"], x[:, t] @ p["input_kernel"]
        if batch_norm:
            hidden_term = bn(hidden_term, "bn_hidden", t, p["hidden_scale"])
            input_term = bn(input_term, "bn_input", t, p["input_scale"])
        f, i, o, g = np.split(hidden_term + input_term + p["bias"], 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        cell = bn(c, "bn_cell", t, p["cell_scale"], p["cell_bias"]) if batch_norm else c
        h = sigmoid(o) * np.tanh(cell)
    return h @ p["output"]["kernel"] + p["output"]["bias"]


@pytest.mark.parametrize("batch_norm, train", [(True, True), (True, False), (False, False)],
                         ids=["bn-train", "bn-eval", "plain"])
def test_the_cell_is_the_papers_equations(batch_norm, train):
    model = small_lstm(batch_norm=batch_norm, two_pass_variance=True)
    variables = random_variables(model)
    images = scaled_rows() / 28
    logits = apply(model, variables, images, train, mutable=("batch_stats",))[0]
    expected = paper_equations(variables, images, train)
    assert np.max(np.abs(np.asarray(logits) - expected)) < 1e-4


def test_each_steps_running_statistics_move_only_with_that_steps_batch():
    model = small_lstm()
    variables = random_variables(model)
    images = scaled_rows()
    _, updates = apply(model, variables, images, True, mutable=("batch_stats",))
    # The input term W_x x_t of each step, directly: its batch statistics enter row t only.
    input_terms = np.einsum("ntd,df->tnf", np.asarray(images).reshape(-1, 28, 28),
                            np.asarray(variables["params"]["input_kernel"]))
    before, after = variables["batch_stats"]["bn_input"], updates["batch_stats"]["bn_input"]
    expected_mean = MOMENTUM * before["mean"] + (1 - MOMENTUM) * input_terms.mean(axis=1)
    expected_var = MOMENTUM * before["var"] + (1 - MOMENTUM) * input_terms.var(axis=1)
    np.testing.assert_allclose(after["mean"], expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after["var"], expected_var, rtol=1e-3, atol=1e-5)
    # Row t's variance follows step t's scale (t + 1)^2: 28 different sets, not one shared.
    batch_var = input_terms.var(axis=1).mean(axis=1)
    assert batch_var[27] > 100 * batch_var[0]


def test_eval_mode_is_per_example_and_mutates_nothing():
    model = small_lstm()
    variables = random_variables(model)
    images = scaled_rows(8) / 28
    logits, updates = apply(model, variables, images, False, mutable=("batch_stats",))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, updates["batch_stats"],
                                                         variables["batch_stats"]))
    one_at_a_time = jnp.concatenate([apply(model, variables, images[i:i + 1], False) for i in range(8)])
    assert float(jnp.max(jnp.abs(one_at_a_time - logits))) < 1e-5


def test_steps_beyond_t_max_use_row_t_max():
    t_max = 5
    short = small_lstm(t_max=t_max)
    variables = random_variables(short)
    # The same statistics in a model with a row for every step: row T_max copied onward.
    full_rows = {layer: {name: jnp.concatenate([values, jnp.repeat(values[-1:], 28 - t_max, axis=0)])
                         for name, values in stats.items()}
                 for layer, stats in variables["batch_stats"].items()}
    images = scaled_rows(8) / 28
    logits_short = apply(short, variables, images, False)
    logits_full = apply(small_lstm(), {**variables, "batch_stats": full_rows}, images, False)
    assert float(jnp.max(jnp.abs(logits_short - logits_full))) < 1e-6
    # In training, only the T_max recorded rows exist and move.
    _, updates = apply(short, variables, images, True, mutable=("batch_stats",))
    assert updates["batch_stats"]["bn_cell"]["mean"].shape == (t_max, HIDDEN)
    assert not jnp.array_equal(updates["batch_stats"]["bn_cell"]["mean"], variables["batch_stats"]["bn_cell"]["mean"])


def test_gradients_agree_with_finite_differences():
    model = small_lstm()
    variables = random_variables(model)
    images, labels = scaled_rows(8) / 28, jnp.arange(8) % 10

    @jax.jit
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

    gradient = jax.grad(loss)(variables["params"])
    leaves, tree = jax.tree_util.tree_flatten(variables["params"])
    for seed in range(3):
        keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
        direction = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, leaf.shape)
                                                        for k, leaf in zip(keys, leaves)])
        step = 1e-3
        shifted = lambda sign: jax.tree_util.tree_map(lambda p, d: p + sign * step * d, variables["params"], direction)
        numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * step)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(gradient),
                                                       jax.tree_util.tree_leaves(direction)))
        assert abs(float(numeric - analytic)) < 2e-2 * abs(float(analytic)) + 1e-3, (seed, numeric, analytic)


def test_bn_scale_starts_at_the_papers_0_1_or_as_asked():
    params = init(small_lstm())["params"]
    assert all(float(jnp.max(jnp.abs(params[name] - 0.1))) == 0 for name in ("hidden_scale", "input_scale",
                                                                             "cell_scale"))
    params = init(small_lstm(bn_scale_init=1.0))["params"]
    assert float(params["cell_scale"].min()) == 1.0
    # The paper's W_h: the candidate block is the identity; the forget gate's bias is 1.
    assert np.array_equal(params["hidden_kernel"][:, 3 * HIDDEN:], np.eye(HIDDEN))
    assert float(params["bias"][:HIDDEN].min()) == 1.0 and float(jnp.abs(params["bias"][HIDDEN:]).max()) == 0.0


def test_sequences_read_the_image_in_the_papers_orders():
    images = jnp.arange(2 * 784, dtype=jnp.float32).reshape(2, 28, 28, 1)
    assert image_sequences(images, "rows").shape == (2, 28, 28)
    pixels = image_sequences(images, "pixels")
    assert pixels.shape == (2, 784, 1) and float(pixels[0, 29, 0]) == 29.0  # row 1, column 1
    permuted = image_sequences(images, "permuted_pixels", permutation_seed=3)
    assert np.array_equal(np.sort(np.asarray(permuted[0, :, 0])), np.arange(784))  # every pixel once
    assert np.array_equal(permuted[0, :, 0], pixels[0, pixel_permutation(3), 0])
    assert not np.array_equal(pixel_permutation(3), pixel_permutation(4))


def test_shared_statistics_are_the_pooled_statistics_of_all_steps():
    from experiments.recurrent_bn import shared_over_steps
    means = jnp.array([[0.0], [2.0]])
    variances = jnp.array([[1.0], [3.0]])
    shared = shared_over_steps({"bn_cell": {"mean": means, "var": variances}}, steps=2)["bn_cell"]
    # Values of both steps together: mean 1, variance (1 + 3) / 2 + spread of the means 1 = 3.
    assert np.allclose(shared["mean"], 1.0) and np.allclose(shared["var"], 3.0)


@pytest.mark.slow
def test_a_short_bn_lstm_run_learns_mnist_rows(mnist):
    config = TrainConfig(**{**paper_settings(batch_norm=True), "lstm_hidden_size": 32}, sequence="rows",
                         max_steps=150, eval_every=150, eval_statistics="precise", precise_bn_batches=20)
    subset = mnist._replace(x_test=mnist.x_test[:2000], y_test=mnist.y_test[:2000])
    history, state = train(config, subset)
    assert history.train_accuracy[-1] > 0.4 and history.precise_val_accuracy[-1] > 0.5  # chance: 0.1
    assert state.batch_stats["bn_hidden"]["mean"].shape == (28, 4 * 32)


@pytest.mark.parametrize("fields, message", [
    (dict(sequence="columns"), "unknown sequence 'columns'; allowed: permuted_pixels, pixels, rows"),
    (dict(lstm_t_max=30), "lstm_t_max must be None or an integer from 1 to the 'rows' sequence's 28 steps, got 30"),
    (dict(lstm_t_max=0), "lstm_t_max must be None or an integer from 1 to the 'rows' sequence's 28 steps, got 0"),
    (dict(lstm_hidden_size=0), "lstm_hidden_size must be a positive integer, got 0"),
    (dict(lstm_bn_scale_init=0.0), "lstm_bn_scale_init must be a positive finite number, got 0.0"),
    (dict(bn=keras_bn(renorm=Renorm())), "the BN-LSTM's per-step BN takes renorm=None only, got Renorm(r_max=3.0, "
                                            "d_max=5.0, momentum=0.99, warmup_steps=0)"),
    (dict(ghost_bn=True), "model 'lstm' takes ghost_bn=False only, got True"),
    (dict(optimizer="adagrad"), "unknown optimizer 'adagrad'; allowed: adam, rmsprop, sgd"),
    (dict(grad_clip_norm=-1.0), "grad_clip_norm must be a positive finite number, got -1.0"),
])
def test_bad_settings_name_the_value_and_what_is_allowed(fields, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**{**paper_settings(batch_norm=True), **fields})
    assert str(error.value) == message


def test_lstm_fields_on_another_model_and_wrong_images_are_refused():
    with pytest.raises(ValueError, match="sequence and the lstm_ fields apply to model 'lstm' only, not 'convnet'"):
        TrainConfig(sequence="pixels")
    with pytest.raises(ValueError, match=r"the LSTM reads 28 x 28 MNIST images, got an array of shape \(2, 30, 28"):
        image_sequences(jnp.zeros((2, 30, 28, 1)), "rows")


@pytest.mark.slow
def test_rmsprop_with_clipping_trains_through_the_one_step():
    config = TrainConfig(**{**paper_settings(batch_norm=True), "lstm_hidden_size": 8})
    state = create_train_state(config, jax.random.key(0))
    images, labels = scaled_rows(8) / 28, jnp.arange(8) % 10
    stepped, metrics = train_step(state, images, labels)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(stepped.params),
                                                                 jax.tree_util.tree_leaves(state.params)))
    # RMSProp's first step moves a weight by up to lr / sqrt(1 - decay) = 1e-3 / sqrt(0.1).
    assert 1e-4 < moved <= 1e-3 / np.sqrt(0.1) * 1.001
    # Clipping, seen through SGD: the step's global norm is learning rate x clip norm.
    sgd = dataclasses.replace(config, optimizer="sgd", learning_rate=0.5, grad_clip_norm=1e-3)
    state = create_train_state(sgd, jax.random.key(0))
    stepped, _ = train_step(state, images, labels)
    change = float(optax.global_norm(jax.tree_util.tree_map(jnp.subtract, stepped.params, state.params)))
    assert abs(change - 0.5 * 1e-3) < 1e-6


def test_the_gradient_reaching_each_step_is_measured_through_the_hidden_offsets():
    # experiments/recurrent_bn.py's gradient-flow measure: || dLoss/dh_t || for every t.
    from experiments.recurrent_bn import hidden_gradient_norms
    images, labels = scaled_rows(16) / 28, jnp.arange(16) % 10
    config = TrainConfig(**{**paper_settings(batch_norm=True), "lstm_hidden_size": HIDDEN})
    norms = hidden_gradient_norms(config, images, labels)
    assert norms.shape == (28,) and np.all(norms > 0)
    # h_T reaches the loss through the output layer alone: dLoss/dh_T = (softmax - one-hot) W_out^T / N.
    state = create_train_state(config, jax.random.key(config.seed))
    logits, _ = apply(model_of(state), {"params": state.params, "batch_stats": state.batch_stats}, images, True,
                      mutable=("batch_stats",))
    error = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 10)) / len(labels)
    last = float(jnp.linalg.norm(error @ state.params["output"]["kernel"].T))
    assert abs(norms[-1] - last) < 1e-5 * last


@pytest.mark.parametrize("bn, message", [
    (BatchNorm(renorm=Renorm()), "the BN-LSTM's per-step BN takes renorm=None only, got Renorm(r_max=3.0, d_max=5.0, "
                                 "momentum=0.99, warmup_steps=0)"),
    (BatchNorm(frozen=True), "the BN-LSTM's per-step BN takes frozen=False only, got True"),
    (BatchNorm(ghost_batch_size=4), "the BN-LSTM's per-step BN takes ghost_batch_size=None only, got 4"),
])
def test_the_lstm_refuses_bn_variants_it_has_not_in_one_line(bn, message):
    with pytest.raises(ValueError) as error:
        LSTM(batch_norm=True, bn=bn)
    assert str(error.value) == message
