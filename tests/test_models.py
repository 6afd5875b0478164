"""The article's nets: structure, train/eval behaviour of their BN state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.nets.models import ACTIVATIONS, ConvNet, count_params, max_pool_2x2
from tolerances import assert_within, normalized_round_off

IMAGES = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))


def init(model):
    return model.init(jax.random.key(1), IMAGES[:1], train=False)


def test_plain_net_matches_keras_structure():
    variables = init(ConvNet(batch_norm=False))
    assert set(variables) == {"params"}  # no batch_stats at all
    # Keras's model.summary() of the article's plain net: 93,322 parameters.
    assert count_params(variables["params"]) == 93322
    assert ConvNet().apply(variables, IMAGES, train=False).shape == (16, 10)


def test_bn_net_has_no_biases_and_bn_after_every_layer():
    variables = init(ConvNet(batch_norm=True))
    params, batch_stats = variables["params"], variables["batch_stats"]
    for name in ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"):
        assert set(params[name]) == {"kernel"}, f"{name} must have use_bias=False under BN"
    # One BN per Conv/Dense, the output layer included.
    bn_features = {name: params[name]["scale"].shape[0] for name in params if name.startswith("BatchNorm")}
    assert sorted(bn_features.values()) == sorted([32, 64, 64, 64, 10])
    # Kernels 93,088 + BN scale/bias 2 * 234; running mean/var 2 * 234 (Keras's "non-trainable").
    assert count_params(params) == 93088 + 468
    assert count_params(batch_stats) == 468


@pytest.mark.slow
def test_glorot_uniform_is_the_default_kernel_init():
    kernel = init(ConvNet())["params"]["Conv_1"]["kernel"]  # (3, 3, 32, 64)
    limit = np.sqrt(6.0 / (9 * 32 + 9 * 64))  # Keras: fan_in = 3*3*32, fan_out = 3*3*64
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
    lecun = init(ConvNet(kernel_init="lecun_normal"))["params"]["Conv_1"]["kernel"]
    assert np.abs(lecun).max() > limit  # normal, not bounded by the uniform limit


def test_eval_mode_one_image_at_a_time_equals_batch_and_mutates_nothing():
    model = ConvNet(batch_norm=True, activation="sigmoid")
    variables = init(model)
    # Move the running statistics away from their initial values first.
    _, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    batch_logits = model.apply(variables, IMAGES, train=False)  # mutable=False: a write would raise
    single_logits = jnp.concatenate([model.apply(variables, IMAGES[i : i + 1], train=False) for i in range(4)])
    np.testing.assert_allclose(single_logits, batch_logits[:4], atol=1e-5)
    _, eval_updates = model.apply(variables, IMAGES, train=False, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, eval_updates["batch_stats"], variables["batch_stats"])


def test_train_mode_updates_batch_stats_and_depends_on_the_batch():
    model = ConvNet(batch_norm=True)
    variables = init(model)
    logits, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    for old, new in zip(jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(updates["batch_stats"])):
        assert not np.allclose(old, new)
    first_half, _ = model.apply(variables, IMAGES[:8], train=True, mutable=["batch_stats"])
    assert not np.allclose(first_half, logits[:8], atol=1e-4)  # batch statistics: other images matter


def test_train_mode_without_mutable_is_an_error():
    model = ConvNet(batch_norm=True)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(init(model), IMAGES, train=True)


@pytest.mark.slow
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_runs(activation):
    model = ConvNet(batch_norm=True, activation=activation)
    logits = model.apply(init(model), IMAGES, train=False)
    assert logits.shape == (16, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_unknown_activation_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown activation 'swishy'; allowed: elu, gelu, relu, sigmoid, tanh"):
        init(ConvNet(activation="swishy"))


@pytest.mark.parametrize("height_width", [(26, 26), (11, 11), (5, 7)])
def test_max_pool_2x2_equals_flax_max_pool(height_width):
    x = jax.random.normal(jax.random.key(2), (2, *height_width, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


@pytest.mark.slow
def test_mlp_is_the_papers_net():
    from bnjax.nets.models import MLP

    plain = MLP().init(jax.random.key(0), IMAGES[:1], train=False)
    assert set(plain) == {"params"}
    assert count_params(plain["params"]) == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10
    bn = MLP(batch_norm=True).init(jax.random.key(0), IMAGES[:1], train=False)
    assert [set(bn["params"][f"Dense_{i}"]) for i in range(4)] == [{"kernel"}] * 3 + [{"kernel", "bias"}]
    logits, state = MLP(batch_norm=True).apply(bn, IMAGES, train=True, mutable=["batch_stats", "intermediates"])
    assert logits.shape == (16, 10)
    sigmoid_inputs = state["intermediates"]["sigmoid_input"]
    assert len(sigmoid_inputs) == 3 and sigmoid_inputs[2].shape == (16, 100)
    # Under BN in train mode, each unit's input to the sigmoid has batch mean `bias` (0 at init).
    np.testing.assert_allclose(sigmoid_inputs[2].mean(axis=0), 0.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["convnet", "mlp"])
def test_a_bias_right_before_bn_gets_exactly_zero_gradient(model):
    """BN subtracts the batch mean, so a constant added before it cancels: the
    gradient of the loss w.r.t. that bias is exactly zero (up to float round-off)."""
    from bnjax.bn.batchnorm import BatchNorm

    class DenseBiasBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.Dense(32, use_bias=True, bias_init=nn.initializers.normal(1.0))(x)
            x = nn.sigmoid(BatchNorm()(x, use_running_average=False))
            return nn.Dense(10)(x)

    class ConvBiasBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), use_bias=True, bias_init=nn.initializers.normal(1.0))(x)
            x = nn.relu(BatchNorm()(x, use_running_average=False))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    net = DenseBiasBN() if model == "mlp" else ConvBiasBN()
    variables = net.init(jax.random.key(0), IMAGES)
    labels = jnp.arange(16) % 10

    def loss(params):
        logits, _ = net.apply({**variables, "params": params}, IMAGES, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

    grads = jax.grad(loss)(variables["params"])
    first_layer = "Dense_0" if model == "mlp" else "Conv_0"
    # Measured: kernel gradients up to 0.12 (conv) / 0.05 (dense); bias gradients
    # 3.6e-7 (jaxlib 0.10) and 1.5e-6 (jaxlib 0.7.1, the floor): round-off of a
    # sum over 16 x 26 x 26 positions that cancels exactly in real arithmetic.
    assert float(jnp.abs(grads[first_layer]["kernel"]).max()) > 1e-2  # the layer does learn
    assert float(jnp.abs(grads[first_layer]["bias"]).max()) < 1e-5  # its bias does not


@pytest.mark.parametrize("position", ["before", "after"])
def test_bn_position_puts_bn_before_or_after_the_activation(position):
    """What BatchNorm_0 normalizes: the first conv's output ("before") or its
    relu ("after"). At init scale = 1 and bias = 0, so BN's output is the
    standardized input, which the test recomputes from the conv's output."""
    model = ConvNet(batch_norm=True, bn_position=position, bn_use_bias=True)
    variables = init(model)
    _, state = model.apply(variables, IMAGES, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=True)
    conv_out = state["intermediates"]["Conv_0"]["__call__"][0]
    bn_out = state["intermediates"]["BatchNorm_0"]["__call__"][0]
    normalized_input = np.asarray(conv_out if position == "before" else nn.relu(conv_out), dtype=np.float64)
    mean, var = normalized_input.mean(axis=(0, 1, 2)), normalized_input.var(axis=(0, 1, 2))
    # Against float64 statistics, within the round-off of float32 statistics
    # over 16 x 26 x 26 positions (tests/tolerances.py): up to 3e-3 where a
    # channel's mean is large against its std ("before": mean^2 / var up to 14).
    tolerance = normalized_round_off(normalized_input, 1e-3, axis=(0, 1, 2))
    assert_within(bn_out, (normalized_input - mean) / np.sqrt(var + 1e-3), tolerance)
    # Keras's epsilon is what BN used: flax's 1e-5 moves the outputs far beyond it.
    assert np.any(np.abs(bn_out - (normalized_input - mean) / np.sqrt(var + 1e-5)) > 10 * tolerance)
    # The output layer has no activation: BN is its last layer in both placements.
    assert set(variables["params"]["Dense_1"]) == {"kernel", "bias"}
    assert "BatchNorm_4" in variables["params"]


def test_bn_use_bias_adds_exactly_the_biases():
    without = count_params(init(ConvNet(batch_norm=True))["params"])
    with_bias = count_params(init(ConvNet(batch_norm=True, bn_use_bias=True))["params"])
    assert with_bias - without == 32 + 64 + 64 + 64 + 10
