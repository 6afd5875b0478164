"""Conversion from real PyTorch and Keras BN nets (numbers exported once into
tests/fixtures/conversion.npz by tests/fixtures/make_conversion_fixtures.py)."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from bnjax.bn.batchnorm import BatchNorm
from bnjax.nets import convert
from bnjax.nets.models import ConvNet
from tolerances import assert_within, network_round_off

TOLERANCE = 1e-5  # absolute, plus 1e-5 relative where values exceed 1 (float32 round-off)
# Train-mode logits normalize with the statistics of this 16-example batch five
# times over, and the gradients flow back through those statistics: each is
# within the net's float32 round-off (tests/tolerances.py), relative to the
# largest value compared; PyTorch, Keras and XLA sum in their own orders.
FIXTURE = np.load(Path(__file__).parent / "fixtures" / "conversion.npz")
IMAGES = FIXTURE["images"]  # (16, 28, 28, 1) NHWC
LABELS = FIXTURE["labels"]


def torch_state(tag: str, kind: str = "state") -> dict:
    prefix = f"{tag}/{kind}/"
    return {key[len(prefix):]: FIXTURE[key] for key in FIXTURE.files if key.startswith(prefix)}


def keras_weights(tag: str, kind: str = "weights") -> list:
    return [FIXTURE[f"{tag}/{kind}/{i:02d}"] for i in range(int(FIXTURE[f"{tag}/num_weights"]))]


def max_difference(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_fixture_records_where_it_came_from():
    assert "torch 2." in str(FIXTURE["versions"]) and "keras 3." in str(FIXTURE["versions"])


# ------------------------------------------------------------------ PyTorch

TORCH_MODEL = ConvNet(batch_norm=True, activation="relu", bn=convert.torch_batch_norm())


def test_torch_bn_eval_logits():
    variables = convert.convnet_from_torch(torch_state("torch_bn"), batch_norm=True)
    logits = TORCH_MODEL.apply(variables, IMAGES, train=False)
    np.testing.assert_allclose(logits, FIXTURE["torch_bn/eval_logits"], atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.slow
def test_torch_bn_train_step_logits_stats_and_gradients():
    variables = convert.convnet_from_torch(torch_state("torch_bn"), batch_norm=True)

    def loss_fn(params):
        logits, updates = TORCH_MODEL.apply({**variables, "params": params}, IMAGES, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), (logits, updates)

    (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    expected = convert.convnet_from_torch(torch_state("torch_bn", "state_after_train"), batch_norm=True)
    relative = network_round_off(TORCH_MODEL, variables, IMAGES)
    assert_within(logits, FIXTURE["torch_bn/train_logits"], relative * np.abs(FIXTURE["torch_bn/train_logits"]).max())
    assert max_difference(updates["batch_stats"], expected["batch_stats"]) < TOLERANCE
    # PyTorch's gradients, converted with the same kernel layouts as the weights.
    torch_grads = {**torch_state("torch_bn", "state_after_train"), **torch_state("torch_bn", "grad")}
    expected_grads = convert.convnet_from_torch(torch_grads, batch_norm=True)["params"]
    for ours, theirs in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
        assert_within(ours, theirs, relative * np.abs(theirs).max())
    # Gradients that skip the batch statistics (BN as a fixed rescaling) lie far outside it.
    def fixed_statistics_loss(params):
        model = ConvNet(batch_norm=True, activation="relu", bn=convert.torch_batch_norm())
        batch_stats = updates["batch_stats"]  # this batch's statistics, folded into the running ones...
        fixed = {"params": params, "batch_stats": jax.tree_util.tree_map(jax.lax.stop_gradient, batch_stats)}
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(fixed, IMAGES, train=False), LABELS).mean()

    wrong_grads = jax.grad(fixed_statistics_loss)(variables["params"])
    assert any(np.abs(np.asarray(ours) - theirs).max() > 10 * relative * np.abs(theirs).max()
               for ours, theirs in zip(jax.tree_util.tree_leaves(wrong_grads), jax.tree_util.tree_leaves(expected_grads)))


@pytest.mark.parametrize(
    "wrong_settings",
    [
        BatchNorm(momentum=0.1, epsilon=1e-5, unbiased_running_var=True),  # PyTorch's momentum taken as is
        BatchNorm(momentum=0.9, epsilon=1e-5, unbiased_running_var=False),  # biased running variance
    ],
    ids=["momentum-not-converted", "biased-running-var"],
)
def test_torch_without_the_conversion_the_stats_differ(wrong_settings):
    variables = convert.convnet_from_torch(torch_state("torch_bn"), batch_norm=True)
    _, updates = ConvNet(batch_norm=True, bn=wrong_settings).apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    expected = convert.convnet_from_torch(torch_state("torch_bn", "state_after_train"), batch_norm=True)
    assert max_difference(updates["batch_stats"], expected["batch_stats"]) > 1e-3


def test_torch_epsilon_matters_for_eval_logits():
    variables = convert.convnet_from_torch(torch_state("torch_bn"), batch_norm=True)
    keras_epsilon = ConvNet(batch_norm=True, bn=BatchNorm(epsilon=1e-3)).apply(variables, IMAGES, train=False)
    assert float(np.abs(keras_epsilon - FIXTURE["torch_bn/eval_logits"]).max()) > 1e-4  # 10x the tolerance


def test_torch_plain_eval_logits():
    variables = convert.convnet_from_torch(torch_state("torch_plain"), batch_norm=False)
    logits = ConvNet(batch_norm=False, activation="relu").apply(variables, IMAGES, train=False)
    np.testing.assert_allclose(logits, FIXTURE["torch_plain/eval_logits"], atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("tag, batch_norm", [("torch_bn", True), ("torch_plain", False)])
def test_torch_round_trip(tag, batch_norm):
    state = torch_state(tag)
    module_names = list(dict.fromkeys(key.rpartition(".")[0] for key in state))
    back = convert.convnet_to_torch(convert.convnet_from_torch(state, batch_norm), module_names)
    assert set(back) == set(state)
    for key in state:
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], state[key])


def test_flatten_order_is_translated():
    weight = np.arange(10 * 576, dtype=np.float32).reshape(10, 576)  # PyTorch (out, c*h*w)
    kernel = convert.dense_kernel_from_torch(weight, flattened_from_chw=(64, 3, 3))
    # Flax row (h, w, c) = 0, 1, 5 is PyTorch column c*9 + h*3 + w = 5*9 + 0 + 1.
    np.testing.assert_array_equal(kernel[(0 * 3 + 1) * 64 + 5], weight[:, 5 * 9 + 1])


def test_momentum_conversion():
    assert convert.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert convert.momentum_to_torch(0.99) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="PyTorch momentum must be in \\[0, 1\\], got 1.5"):
        convert.momentum_from_torch(1.5)


# ------------------------------------------------------------------ Keras

KERAS_MODEL = ConvNet(batch_norm=True, activation="sigmoid", bn=convert.keras_batch_norm())


def test_keras_bn_eval_and_train_mode():
    variables = convert.convnet_from_keras(keras_weights("keras_bn"), batch_norm=True)
    np.testing.assert_allclose(KERAS_MODEL.apply(variables, IMAGES, train=False), FIXTURE["keras_bn/eval_logits"], atol=TOLERANCE, rtol=TOLERANCE)
    logits, updates = KERAS_MODEL.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    tolerance = network_round_off(KERAS_MODEL, variables, IMAGES) * np.abs(FIXTURE["keras_bn/train_logits"]).max()
    assert_within(logits, FIXTURE["keras_bn/train_logits"], tolerance)
    # Flax's epsilon (1e-5) for Keras's (1e-3) moves the train-mode logits by 0.2, 10 times the tolerance.
    flax_epsilon = ConvNet(batch_norm=True, activation="sigmoid", bn=BatchNorm(momentum=0.99, epsilon=1e-5))
    wrong_logits, _ = flax_epsilon.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(wrong_logits) - FIXTURE["keras_bn/train_logits"]).max() > 5 * tolerance
    expected = convert.convnet_from_keras(keras_weights("keras_bn", "weights_after_train"), batch_norm=True)
    assert max_difference(updates["batch_stats"], expected["batch_stats"]) < TOLERANCE


def test_keras_plain_eval_logits_and_round_trips():
    weights = keras_weights("keras_plain")
    variables = convert.convnet_from_keras(weights, batch_norm=False)
    logits = ConvNet(batch_norm=False, activation="sigmoid").apply(variables, IMAGES, train=False)
    np.testing.assert_allclose(logits, FIXTURE["keras_plain/eval_logits"], atol=TOLERANCE, rtol=TOLERANCE)
    for tag, batch_norm in (("keras_plain", False), ("keras_bn", True)):
        original = keras_weights(tag)
        back = convert.convnet_to_keras(convert.convnet_from_keras(original, batch_norm))
        assert len(back) == len(original)
        for a, b in zip(back, original):
            np.testing.assert_array_equal(a, b)


def test_keras_wrong_architecture_is_reported():
    with pytest.raises(ValueError, match="got 10 Keras weight arrays; the BN ConvNet has 25"):
        convert.convnet_from_keras(keras_weights("keras_plain"), batch_norm=True)
