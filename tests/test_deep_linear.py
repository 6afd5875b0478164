"""The deep linear network (bnjax/nets/linear.py): its layers, its data,
full-batch gradient descent on it with and without BN, and internal
covariate shift measured layer by layer on it (training/landscape.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.nets.linear import DeepLinearNet, gaussian_regression
from bnjax.training.landscape import gradient_shift

X, Y = gaussian_regression(jax.random.key(0), examples=256)


def loss_of(model, batch_stats):
    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats is not None else {})}
        prediction = model.apply(variables, X, train=True, mutable=["batch_stats"])[0]
        return 0.5 * jnp.mean(jnp.sum(jnp.square(prediction - Y), axis=-1))
    return loss_fn


def test_the_data_is_a_gaussian_linear_target():
    x, y = gaussian_regression(jax.random.key(1), examples=4000)
    assert x.shape == (4000, 10) and y.shape == (4000, 10)
    np.testing.assert_allclose(np.asarray(x).std(), 1.0, atol=0.02)
    solution, *_ = np.linalg.lstsq(np.asarray(x, np.float64), np.asarray(y, np.float64), rcond=None)
    np.testing.assert_allclose(np.asarray(x, np.float64) @ solution, y, atol=1e-4)  # exactly linear
    assert 0.5 < float(np.asarray(y).var()) < 1.5


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_the_papers_net_has_25_layers_of_10_units(batch_norm):
    model = DeepLinearNet(batch_norm=batch_norm)
    params = model.init(jax.random.key(2), X, train=False)["params"]
    assert sorted(params) == sorted(name for group in model.layer_groups() for name in group)
    assert len(model.layer_groups()) == 25 and all(params[f"Dense_{index}"]["kernel"].shape == (10, 10)
                                                   for index in range(25))
    assert sum(name.startswith("BatchNorm") for name in params) == (24 if batch_norm else 0)


@pytest.mark.slow  # each layer's gradient, op by op
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_full_batch_descent_trains_it_and_each_layers_ics_is_measured(batch_norm):
    # 8 layers here, to keep the test short: the measure is the same at 25.
    model = DeepLinearNet(depth=8, batch_norm=batch_norm)
    variables = model.init(jax.random.key(2), X, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats")
    loss_fn = loss_of(model, batch_stats)

    @jax.jit
    def descend(params):
        return jax.tree_util.tree_map(lambda value, grad: value - 0.01 * grad, params, jax.grad(loss_fn)(params))

    first = float(loss_fn(params))
    for _ in range(50):
        params = descend(params)
    assert float(loss_fn(params)) < 0.9 * first
    shifts = gradient_shift(loss_fn, params, descend(params), model.layer_groups())
    assert list(shifts) == [f"Dense_{index}" for index in range(1, 8)]
    for shift in shifts.values():
        assert np.isfinite(float(shift["l2"])) and -1.0 <= float(shift["cosine"]) <= 1.0 + 1e-6
        assert float(shift["relative"]) > 0.0  # every layer below moved, so every layer's gradient did


def test_bad_sizes_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^depth must be an integer >= 2, got 1$"):
        DeepLinearNet(depth=1)
    with pytest.raises(ValueError, match=r"^width must be an integer >= 1, got 0$"):
        DeepLinearNet(width=0)
