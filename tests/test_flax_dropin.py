"""bnjax.BatchNorm is a drop-in for flax.linen.BatchNorm: held to flax itself,
feature by feature (every field, the call's mask, other axes, half and
complex dtypes, both variance paths, inits, no bias / no scale): outputs,
updated running statistics and gradients, train and eval mode."""

import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.bn.batchnorm import BatchNorm, Renorm

X = 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) + 1.0
WEIGHTS = jax.random.normal(jax.random.key(1), X.shape)  # a loss that weighs every output differently


def run(module, x, use_running_average: bool, variables=None, mask=None):
    """(output, updated batch_stats, gradients w.r.t. params and x) of one call."""
    variables = variables or module.init(jax.random.key(2), x, use_running_average=True)

    def loss(params, x):
        y, updates = module.apply({**variables, "params": params} if params else variables, x, use_running_average=use_running_average,
                                  mask=mask, mutable=["batch_stats"])
        return jnp.sum(jnp.real(y * WEIGHTS)), (y, updates)

    (_, (y, updates)), gradients = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables.get("params", {}), x)
    return y, updates.get("batch_stats"), gradients, variables


def assert_same_as_flax(settings: dict, x=X, mask=None):
    """bnjax and flax with the same settings: the same variables; the same
    outputs, running statistics and gradients bit for bit: the same
    operations in the same order, forward and backward."""
    ours, theirs = BatchNorm(**settings), nn.BatchNorm(**settings)
    our_variables = ours.init(jax.random.key(2), x, use_running_average=True)
    their_variables = theirs.init(jax.random.key(2), x, use_running_average=True)
    assert jax.tree_util.tree_structure(our_variables) == jax.tree_util.tree_structure(their_variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, our_variables, their_variables)
    for use_running_average in (False, True):
        (our_y, our_stats, our_gradients, _) = run(ours, x, use_running_average, our_variables, mask)
        (their_y, their_stats, their_gradients, _) = run(theirs, x, use_running_average, their_variables, mask)
        assert our_y.dtype == their_y.dtype
        np.testing.assert_array_equal(our_y, their_y)
        jax.tree_util.tree_map(np.testing.assert_array_equal, our_stats, their_stats)
        assert (jax.tree_util.tree_map(lambda leaf: leaf.dtype, our_gradients)
                == jax.tree_util.tree_map(lambda leaf: leaf.dtype, their_gradients))
        jax.tree_util.tree_map(np.testing.assert_array_equal, our_gradients, their_gradients)


def test_fields_order_and_defaults_are_flaxs():
    flax_fields = [(field.name, field.default) for field in dataclasses.fields(nn.BatchNorm)
                   if field.name not in ("parent", "name")]
    our_fields = [(field.name, field.default) for field in dataclasses.fields(BatchNorm)
                  if field.name not in ("parent", "name")]
    assert our_fields[:len(flax_fields)] == flax_fields
    # The variants come after flax's fields and only by keyword.
    assert [name for name, _ in our_fields[len(flax_fields):]] == [
        "running_average", "unbiased_running_var", "renorm", "frozen", "ghost_batch_size"]
    assert all(field.kw_only for field in dataclasses.fields(BatchNorm) if field.name == "renorm")
    assert (list(inspect.signature(BatchNorm.__call__).parameters)
            == list(inspect.signature(nn.BatchNorm.__call__).parameters))


def test_positional_arguments_mean_what_they_mean_in_flax():
    # flax: BatchNorm(use_running_average, axis, momentum, epsilon, ...)
    assert BatchNorm(True).use_running_average is True
    assert_same_as_flax(dict(use_running_average=None, axis=-1, momentum=0.9, epsilon=1e-3))
    x = X
    ours = BatchNorm(False, -1, 0.9, 1e-3)
    theirs = nn.BatchNorm(False, -1, 0.9, 1e-3)
    variables = theirs.init(jax.random.key(0), x)
    np.testing.assert_array_equal(ours.apply(variables, x, mutable=["batch_stats"])[0],
                                  theirs.apply(variables, x, mutable=["batch_stats"])[0])
    with pytest.raises(TypeError):  # the variants are keyword-only
        BatchNorm(False, -1, 0.9, 1e-3, None, jnp.float32, True, True, nn.initializers.zeros,
                  nn.initializers.ones, None, None, True, True, "cumulative")


@pytest.mark.parametrize("settings", [
    dict(),  # flax's defaults: momentum 0.99, epsilon 1e-5
    dict(momentum=0.9, epsilon=1e-3),
    dict(axis=1),  # NCHW
    dict(axis=(1, 3)),  # several feature axes
    dict(use_bias=False),
    dict(use_scale=False),
    dict(use_bias=False, use_scale=False),
    dict(bias_init=nn.initializers.normal(0.5), scale_init=nn.initializers.uniform(2.0)),
    dict(use_fast_variance=False),
    dict(param_dtype=jnp.bfloat16),
], ids=["defaults", "keras-momentum-epsilon", "axis-1", "axes-1-3", "no-bias", "no-scale", "neither",
        "random-inits", "two-pass-variance", "bfloat16-params"])
def test_equals_flax_bit_for_bit(settings):
    assert_same_as_flax(settings)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("force_float32_reductions", [True, False])
def test_half_precision_inputs_and_outputs_equal_flax(dtype, force_float32_reductions):
    x = X.astype(dtype)
    assert_same_as_flax(dict(dtype=dtype, force_float32_reductions=force_float32_reductions), x=x)
    assert_same_as_flax(dict(param_dtype=dtype, force_float32_reductions=force_float32_reductions), x=x)
    y = BatchNorm(dtype=dtype).init_with_output(jax.random.key(0), x, use_running_average=False)[0]
    assert y.dtype == dtype


def test_mask_equals_flax():
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, X.shape[:-1] + (1,))
    assert_same_as_flax(dict(momentum=0.9), mask=mask)
    # The masked-out values do not count: changing them leaves the statistics as they were.
    shifted = jnp.where(mask, X, X + 100.0)
    variables = BatchNorm().init(jax.random.key(0), X, use_running_average=True)
    stats = [BatchNorm(momentum=0.0).apply(variables, x, use_running_average=False, mask=mask,
                                           mutable=["batch_stats"])[1]["batch_stats"] for x in (X, shifted)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, *stats)


def test_complex_inputs_equal_flax():
    x = (X + 1j * jnp.flip(X, axis=0)).astype(jnp.complex64)
    assert_same_as_flax(dict(momentum=0.9), x=x)
    y = BatchNorm().init_with_output(jax.random.key(0), x, use_running_average=False)[0]
    assert float(jnp.mean(jnp.abs(y) ** 2)) == pytest.approx(1.0, rel=1e-4)  # unit variance, as flax's


def test_axis_name_equals_flax_over_a_named_axis():
    # vmap with an axis name stands in for 4 devices, each holding 2 of the batch's 8 examples.
    shards = X.reshape(4, 2, *X.shape[1:])
    ours, theirs = BatchNorm(axis_name="batch"), nn.BatchNorm(axis_name="batch")
    variables = theirs.init(jax.random.key(0), shards[0], use_running_average=True)

    def on_devices(module):
        return jax.vmap(lambda shard: module.apply(variables, shard, use_running_average=False,
                                                   mutable=["batch_stats"]), axis_name="batch")(shards)

    jax.tree_util.tree_map(np.testing.assert_array_equal, on_devices(ours), on_devices(theirs))


def test_inputs_with_nothing_to_reduce_equal_flax():
    # A 1-D input (flax's test_bind_stateful), and every axis a feature axis:
    # the statistics are the values themselves, as flax computes them.
    assert_same_as_flax(dict(), x=X[0, 0, 0])
    assert_same_as_flax(dict(axis=(0, 1, 2, 3)))


def test_per_example_inputs_under_vmap_equal_flax():
    # How per-example code uses BN: each example alone, its statistics averaged over the vmapped axis.
    examples = X.reshape(-1, X.shape[-1])[:16]
    variables = nn.BatchNorm().init(jax.random.key(0), examples[0], use_running_average=True)

    def per_example(module):
        return jax.vmap(lambda example: module.apply(variables, example, use_running_average=False,
                                                     mutable=["batch_stats"]), axis_name="batch")(examples)

    ours, theirs = per_example(BatchNorm(axis_name="batch")), per_example(nn.BatchNorm(axis_name="batch"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, theirs)
    np.testing.assert_allclose(ours[0], nn.BatchNorm(use_running_average=False).init_with_output(
        jax.random.key(0), examples)[0], rtol=1e-5, atol=1e-5)  # the batch's BN, example by example


def test_drop_in_for_flax_in_a_partial():
    norm = functools.partial(bnjax.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5)
    flax_norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5)
    for make in (norm, flax_norm):
        assert make(name="bn").use_running_average is False


@pytest.mark.parametrize("variant", [
    dict(running_average="debiased_ema"), dict(running_average="cumulative"), dict(unbiased_running_var=True),
    dict(renorm=Renorm(r_max=1.5, d_max=0.5)), dict(frozen=True), dict(ghost_batch_size=4)])
def test_each_variant_is_one_keyword_away_and_moves_something(variant):
    plain, varied = BatchNorm(momentum=0.9), BatchNorm(momentum=0.9, **variant)
    variables = varied.init(jax.random.key(0), X, use_running_average=True)
    plain_variables = {"params": variables["params"],
                       "batch_stats": {name: variables["batch_stats"][name] for name in ("mean", "var")}}
    y, updates = varied.apply(variables, X * 1.5, use_running_average=False, mutable=["batch_stats"])
    plain_y, plain_updates = plain.apply(plain_variables, X * 1.5, use_running_average=False, mutable=["batch_stats"])
    moved = (float(jnp.abs(y - plain_y).max()),
             float(jnp.abs(updates["batch_stats"]["var"] - plain_updates["batch_stats"]["var"]).max()))
    assert max(moved) > 1e-3, variant


@pytest.mark.parametrize("settings, message", [
    (dict(momentum=1.5), "momentum must be a number in [0, 1] (the weight of the old running value), got 1.5"),
    (dict(momentum=-0.1), "momentum must be a number in [0, 1] (the weight of the old running value), got -0.1"),
    (dict(momentum=True), "momentum must be a number in [0, 1] (the weight of the old running value), got True"),
    (dict(epsilon=0.0), "epsilon must be a number > 0, got 0.0"),
    (dict(epsilon=-1), "epsilon must be a number > 0, got -1"),
    (dict(use_running_average="yes"), "use_running_average must be None, True or False, got 'yes'"),
    (dict(axis=1.5), "axis must be an integer or a non-empty tuple of integers, got 1.5"),
    (dict(dtype=jnp.int32), "dtype must be None or a floating-point dtype (float32, bfloat16, ...), got "),
    (dict(param_dtype=jnp.int8), "param_dtype must be a floating-point dtype (float32, bfloat16, ...), got "),
    (dict(use_bias=1), "use_bias must be True or False, got 1"),
    (dict(scale_init=1.0), "scale_init must be an initializer (key, shape, dtype) -> array, got 1.0"),
    (dict(running_average="EMA"), "unknown running_average 'EMA'; allowed: cumulative, debiased_ema, ema"),
    (dict(renorm=True), "renorm must be None or a bnjax.Renorm(...) (Keras's renorm=True is renorm=bnjax.Renorm()), "
                        "got True"),
])
def test_bad_settings_are_refused_in_one_line_when_made(settings, message):
    with pytest.raises(ValueError) as error:
        BatchNorm(**settings)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("settings, call, message", [
    (dict(), dict(), 'Parameter "use_running_average" must be passed to the constructor or at call time.'),  # flax's
    (dict(axis=4), dict(use_running_average=False), "axis 4 is out of range for an input of 4 dimensions"),
    (dict(axis=0, ghost_batch_size=4), dict(use_running_average=False),
     "ghost_batch_size groups the examples along axis 0, which axis=0 makes a feature axis"),
    (dict(ghost_batch_size=4), dict(use_running_average=False, mask=jnp.ones(X.shape, bool)),
     "mask is not supported with ghost_batch_size"),
])
def test_bad_calls_are_refused_in_one_line(settings, call, message):
    with pytest.raises(ValueError) as error:
        BatchNorm(**settings).init(jax.random.key(0), X, **call)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_integer_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="BatchNorm normalizes floating-point or complex inputs, got dtype int32"):
        BatchNorm().init(jax.random.key(0), jnp.ones((4, 3), jnp.int32), use_running_average=False)

GROUPS_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
import bnjax
x = 2.0 * jax.random.normal(jax.random.key(0), (4, 2, 3, 3, 5)) + 1.0   # 4 devices, 2 examples each
groups = [[0, 1], [2, 3]]
def on_devices(module):
    variables = module.init(jax.random.key(1), x[0], use_running_average=True)
    return jax.pmap(lambda part: module.apply(variables, part, use_running_average=False, mutable=["batch_stats"]),
                    axis_name="devices")(x)
ours = on_devices(bnjax.BatchNorm(axis_name="devices", axis_index_groups=groups))
theirs = on_devices(nn.BatchNorm(axis_name="devices", axis_index_groups=groups))
alone = on_devices(bnjax.BatchNorm(axis_name="devices"))
equal = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)))
mean = np.asarray(ours[1]["batch_stats"]["mean"])
print(json.dumps({"equal": equal, "group_means_differ": float(np.abs(mean[0] - mean[2]).max()),
                  "within_group": float(np.abs(mean[0] - mean[1]).max()),
                  "groups_matter": float(np.abs(np.asarray(alone[1]["batch_stats"]["mean"])[0] - mean[0]).max())}))
"""


@pytest.mark.slow
def test_axis_index_groups_equal_flax_on_four_devices():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", GROUPS_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["equal"]  # bit for bit flax's, outputs and statistics
    assert found["within_group"] == 0.0  # devices 0 and 1 share their group's statistics ...
    assert found["group_means_differ"] > 1e-3  # ... which differ from the other group's
    assert found["groups_matter"] > 1e-3  # and from all four devices' together
