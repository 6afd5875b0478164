"""Frozen BN (`BatchNorm(frozen=True)`, `TrainConfig(bn=keras_bn(frozen=True))`): equal
to torchvision's FrozenBatchNorm2d on numbers exported once from it
(tests/fixtures/make_frozen_bn_fixtures.py), and in training nothing of BN
moves: neither its statistics nor its scale and bias."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.bn.batchnorm import BatchNorm
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.steps import create_train_state
from bnjax.training.train import train

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "frozen_bn.npz")
# torchvision computes x * (w * rsqrt(var + eps)) + (b - mean * w * rsqrt(var + eps));
# bnjax (x - mean) * (rsqrt(var + eps) * w) + b: the same numbers in another
# float32 order. Measured (torch 2.13.0, torchvision 0.28.0): outputs within
# 1.9e-6 (values up to 17), input gradients within 1.2e-7.
TOLERANCE = dict(rtol=1e-6, atol=2e-6)
NCHW_TO_NHWC = (0, 2, 3, 1)


def test_train_mode_output_and_gradient_equal_torchvision():
    assert int(FIXTURE["trainable_parameters"]) == 0  # torchvision's frozen BN learns nothing either
    layer = BatchNorm(epsilon=float(FIXTURE["epsilon"]), frozen=True)
    variables = {
        "params": {"scale": jnp.asarray(FIXTURE["buffer/weight"]), "bias": jnp.asarray(FIXTURE["buffer/bias"])},
        "batch_stats": {"mean": jnp.asarray(FIXTURE["buffer/running_mean"]),
                        "var": jnp.asarray(FIXTURE["buffer/running_var"])},
    }
    x = jnp.asarray(FIXTURE["input"].transpose(NCHW_TO_NHWC))
    weights = jnp.asarray(FIXTURE["weights"].transpose(NCHW_TO_NHWC))

    def loss(params, x):
        y, updates = layer.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(y * weights), (y, updates["batch_stats"])

    (_, (y, batch_stats)), (grad_params, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    np.testing.assert_allclose(y, FIXTURE["output"].transpose(NCHW_TO_NHWC), **TOLERANCE)
    np.testing.assert_allclose(grad_x, FIXTURE["grad_input"].transpose(NCHW_TO_NHWC), **TOLERANCE)
    for name, torch_name in (("mean", "running_mean"), ("var", "running_var")):  # nothing updated, as torchvision
        np.testing.assert_array_equal(batch_stats[name], FIXTURE[f"after/{torch_name}"])
    assert all(float(jnp.abs(grad).max()) == 0.0 for grad in jax.tree_util.tree_leaves(grad_params))
    # and an unfrozen BN in train mode gives other numbers (the check above can fail)
    unfrozen = BatchNorm(epsilon=float(FIXTURE["epsilon"])).apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]
    assert float(jnp.abs(unfrozen - y).max()) > 0.1


def test_a_frozen_bn_net_trains_everything_but_bn(tiny_data):
    config = TrainConfig(batch_norm=True, bn=keras_bn(frozen=True), model="mlp", max_steps=4, eval_every=4,
                         eval_batch_size=32)
    start = create_train_state(config, jax.random.key(config.seed))
    history, state = train(config, tiny_data)
    assert np.isfinite(history.train_loss[-1])
    bn_layers = [name for name in start.params if name.startswith("BatchNorm")]
    dense_layers = [name for name in start.params if name.startswith("Dense")]
    assert len(bn_layers) == 3 and dense_layers
    for name in bn_layers:
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(state.params[name][leaf], start.params[name][leaf])
        for stat in ("mean", "var"):
            np.testing.assert_array_equal(state.batch_stats[name][stat], start.batch_stats[name][stat])
    assert all(float(jnp.abs(state.params[name]["kernel"] - start.params[name]["kernel"]).max()) > 0
               for name in dense_layers)
    # The same net with BN not frozen trains otherwise (the checks above can fail).
    thawed, _ = train(dataclasses.replace(config, bn=None), tiny_data)
    assert thawed.train_loss != history.train_loss
