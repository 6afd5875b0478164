"""What Santurkar et al. ("How Does Batch Normalization Help Optimization?",
NeurIPS 2018) measure along a training path, for any model: each a function
of a loss `loss_fn(params) -> scalar` (a model, its other variables and one
batch closed over) and parameters.

  * `gradient_shift`: internal covariate shift as the paper defines it: the
    gradient of the loss with respect to layer i's weights before (G) and
    after (G') the layers below i take their update, ||G - G'||,
    cos(G, G') and ||G - G'|| / ||G||. One gradient per layer (the first has
    nothing below it).
  * `gradient_line`: the loss and its gradient along the gradient direction,
    theta - eta * g for each step size eta: the loss's spread over the line
    (max - min), the gradient's change ||grad(theta - eta g) - g|| (how
    predictive the gradient is), and the "effective beta-smoothness", the
    largest gradient change per unit of distance moved, max over eta of
    ||grad(theta - eta g) - g|| / ||eta g||. One gradient per step size, plus one.
  * `moments_shift`: how far each layer input's per-unit mean and variance
    move between two sets of its values (before and after a step).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def gradient_shift(loss_fn: Callable, params: dict, updated_params: dict,
                   layers: Sequence[Sequence[str]], measured: str = "kernel") -> dict[str, dict[str, jax.Array]]:
    """For each layer group i > 0 of `layers` (the top-level names in
    `params` of each layer, input side first, e.g. [("Conv_0", "BatchNorm_0"),
    ...]): G = d loss / d params[layers[i][0]][measured] at `params`, G' the
    same with every group below i taken from `updated_params` (the next
    step's). Returns {layers[i][0]: {"l2": ||G - G'||, "cosine": cos(G, G'),
    "relative": ||G - G'|| / ||G||}}."""
    gradient = jax.grad(loss_fn)
    at_start = gradient(params)
    shifts = {}
    for index in range(1, len(layers)):
        below = {name for group in layers[:index] for name in group}
        mixed = {name: updated_params[name] if name in below else value for name, value in params.items()}
        name = layers[index][0]
        before, after = at_start[name][measured].ravel(), gradient(mixed)[name][measured].ravel()
        norms = jnp.linalg.norm(before) * jnp.linalg.norm(after)
        l2, size = jnp.linalg.norm(before - after), jnp.linalg.norm(before)
        shifts[name] = {"l2": l2,
                        "cosine": jnp.where(norms > 0, jnp.dot(before, after) / jnp.where(norms > 0, norms, 1), 1.0),
                        "relative": jnp.where(size > 0, l2 / jnp.where(size > 0, size, 1), 0.0)}
    return shifts


def gradient_line(loss_fn: Callable, params, step_sizes: Sequence[float]) -> dict[str, jax.Array]:
    """The loss and its gradient along theta - eta * g (g the gradient at
    `params`) for each of `step_sizes`: "losses" (K,), "gradient_changes"
    (K,), "loss_spread" (max - min of the losses, theta's included),
    "max_gradient_change", "beta" (the effective beta-smoothness) and
    "grad_norm" (||g||: the loss's own slope, its Lipschitzness along the
    path, told apart from beta, how fast that slope changes)."""
    loss, grad = jax.value_and_grad(loss_fn)(params)
    flat_grad = _flat(grad)
    grad_norm = jnp.linalg.norm(flat_grad)
    step_sizes = jnp.asarray(step_sizes, jnp.float32)

    def at(step_size):
        moved = jax.tree_util.tree_map(lambda value, g: value - step_size * g, params, grad)
        moved_loss, moved_grad = jax.value_and_grad(loss_fn)(moved)
        return moved_loss, jnp.linalg.norm(_flat(moved_grad) - flat_grad)

    # A Python loop, not lax.map: XLA:CPU keeps a convolution's backward pass
    # inside a compiled loop in a much slower form (engine/strategy.py, unroll).
    losses, changes = (jnp.stack(values) for values in zip(*(at(step_sizes[k]) for k in range(len(step_sizes)))))
    distances = step_sizes * grad_norm
    return {"losses": losses, "gradient_changes": changes,
            "loss_spread": jnp.maximum(losses.max(), loss) - jnp.minimum(losses.min(), loss),
            "max_gradient_change": changes.max(),
            "beta": jnp.max(jnp.where(distances > 0, changes / jnp.where(distances > 0, distances, 1), 0.0)),
            "grad_norm": grad_norm}


def moments_shift(before: jax.Array, after: jax.Array) -> dict[str, jax.Array]:
    """How a layer input's distribution moved: `before` and `after` hold its
    values (..., units) at two steps. The units' mean move, in units of the
    layer's typical standard deviation (the root of the units' mean variance
    before), and their mean variance change relative to that mean variance:
    {"mean_shift", "variance_shift"}. (Scaled by the whole layer's spread,
    not unit by unit, so that a unit that hardly varies cannot dominate.)"""
    axes = tuple(range(before.ndim - 1))
    mean_before, mean_after = before.mean(axes), after.mean(axes)
    var_before, var_after = before.var(axes), after.var(axes)
    spread = jnp.maximum(var_before.mean(), jnp.finfo(jnp.float32).tiny)
    return {"mean_shift": jnp.mean(jnp.abs(mean_after - mean_before)) / jnp.sqrt(spread),
            "variance_shift": jnp.mean(jnp.abs(var_after - var_before)) / spread}


def layer_inputs(apply: Callable[[], object], module_types: tuple = (nn.Conv, nn.Dense)) -> dict[str, jax.Array]:
    """The input of every call of a module of `module_types` while `apply()`
    runs (e.g. `lambda: model.apply(variables, x, train=True, mutable=[...])`),
    by the module's name: what each layer of a net reads."""
    inputs = {}

    def record(next_method, args, kwargs, context):
        if isinstance(context.module, module_types) and context.method_name == "__call__":
            inputs[context.module.name] = args[0]
        return next_method(*args, **kwargs)

    with nn.intercept_methods(record):
        apply()
    return inputs
