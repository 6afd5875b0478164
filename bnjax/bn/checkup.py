"""A BN check-up for any linen model: are its running averages what its
weights need?

    report = bnjax.checkup(model, variables, train_batches, eval_batches, accuracy,
                           train_kwargs={"train": True}, eval_kwargs={"train": False})
    print(report)

It scores the model on `eval_batches` ((inputs, targets) pairs) with `metric`
three ways, with BN normalizing by
  - the running averages (what eval mode uses, and what a deployed model uses),
  - precise statistics, re-estimated for the current weights from
    `train_batches` (`bnjax.update_bn`),
  - each evaluation batch's own statistics (train mode, nothing kept),
and for every BN layer says how far the running averages are from the
re-estimated ones: the largest |running mean - precise mean| in units of the
precise std, and the range of running var / precise var. A last line says
whether the running averages are stale (precise statistics score better by
more than `tolerance`) and what would fix it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.bn.update_bn import update_bn
from bnjax.support.checks import is_real


@dataclasses.dataclass(frozen=True)
class Checkup:
    """What `checkup` found: the metric three ways, each BN layer's gap and the verdict."""

    running: float
    precise: float
    batch: float
    layers: dict  # {"path/of/layer": {"mean_gap": float, "var_ratio_min": float, "var_ratio_max": float}}
    stale: bool
    verdict: str

    def __str__(self) -> str:
        lines = [f"metric with running averages {self.running:.4f}, precise statistics {self.precise:.4f}, "
                 f"batch statistics {self.batch:.4f}",
                 f"{'BN layer':32s} {'mean gap (std)':>14s} {'running var / precise':>22s}"]
        for name, gap in self.layers.items():
            lines.append(f"{name:32s} {gap['mean_gap']:14.3f} "
                         f"{gap['var_ratio_min']:10.3f} - {gap['var_ratio_max']:<9.3f}")
        return "\n".join(lines + [self.verdict])


def layer_gaps(running_stats, precise_stats, epsilon: float = 1e-5) -> dict:
    """For each BN layer (a `batch_stats` tree, any nesting), how far the
    running averages lie from the precise ones."""
    gaps = {}
    for path, running_mean in jax.tree_util.tree_flatten_with_path(running_stats)[0]:
        if getattr(path[-1], "key", None) != "mean":
            continue
        layer = [getattr(entry, "key", entry) for entry in path[:-1]]
        running, precise = running_stats, precise_stats
        for name in layer:
            running, precise = running[name], precise[name]
        std = np.sqrt(np.asarray(precise["var"], np.float64) + epsilon)
        ratio = (np.asarray(running["var"], np.float64) + epsilon) / (np.asarray(precise["var"], np.float64) + epsilon)
        gaps["/".join(str(name) for name in layer)] = {
            "mean_gap": float(np.max(np.abs(np.asarray(running_mean, np.float64) - np.asarray(precise["mean"])) / std)),
            "var_ratio_min": float(ratio.min()), "var_ratio_max": float(ratio.max())}
    return gaps


def _score(outputs_of, eval_batches, metric) -> float:
    """The example-weighted mean of `metric(outputs, targets)` over the batches."""
    total, examples = 0.0, 0
    for inputs, targets in eval_batches:
        count = len(jax.tree_util.tree_leaves(targets)[0])
        total += float(metric(outputs_of(inputs), targets)) * count
        examples += count
    if examples == 0:
        raise ValueError("checkup needs at least one evaluation batch, got none")
    return total / examples


def check_tolerance(tolerance) -> None:
    if not is_real(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")


def verdict(running: float, precise: float, higher_is_better: bool, tolerance: float) -> tuple[bool, str]:
    gain = (precise - running) if higher_is_better else (running - precise)
    if gain > tolerance:
        return True, (f"stale: the running averages cost {gain:.4f} of the metric against statistics re-estimated "
                      f"for these weights; evaluate after precise BN (bnjax.update_bn), or train with a lower BN "
                      f"momentum so the averages follow the weights faster")
    return False, (f"up to date: the running averages score within {max(gain, 0.0):.4f} of statistics re-estimated "
                   f"for these weights (tolerance {tolerance})")


def checkup(model: nn.Module, variables: Mapping[str, Any], train_batches: Iterable[Any],
            eval_batches: Iterable[tuple[Any, Any]], metric: Callable[[Any, Any], float], *, train_kwargs: dict | None = None,
            eval_kwargs: dict | None = None, higher_is_better: bool = True, tolerance: float = 0.005) -> Checkup:
    """The check-up (module doc) of a linen `model` with `variables`.
    `train_batches`: inputs for precise BN (a list, or any iterable that can
    be read once); `eval_batches`: (inputs, targets) pairs, read three times
    (pass a list); `metric(outputs, targets)`: a number per batch, averaged
    weighted by examples. `train_kwargs` / `eval_kwargs` put the model in
    train / eval mode as its own steps do (e.g. {"train": True}).
    Five inputs every check-up needs, and four keyword-only options with
    defaults (the way flax's modules take their settings).

    Args:
      model, variables: the linen model and its variables.
      train_batches: inputs for precise BN.
      eval_batches: (inputs, targets) pairs.
      metric: `metric(outputs, targets) -> float` per batch (`accuracy`).
      train_kwargs, eval_kwargs: the keyword arguments of train / eval mode.
      higher_is_better: whether a larger metric is better.
      tolerance: by how much precise statistics must score better before
        the running averages are called stale.

    Returns:
      A `Checkup`: the metric with running, precise and batch statistics,
      and its verdict on the running averages."""
    check_tolerance(tolerance)
    train_kwargs, eval_kwargs = dict(train_kwargs or {}), dict(eval_kwargs or {})
    eval_batches = list(eval_batches)
    precise_stats = update_bn(model, variables, train_batches, **train_kwargs)
    precise_variables = {**variables, "batch_stats": precise_stats}
    evaluate = jax.jit(lambda variables, inputs: model.apply(variables, inputs, **eval_kwargs))
    batch_mode = jax.jit(lambda variables, inputs: model.apply(variables, inputs, mutable=["batch_stats"],
                                                                **train_kwargs)[0])
    running = _score(lambda inputs: evaluate(variables, inputs), eval_batches, metric)
    precise = _score(lambda inputs: evaluate(precise_variables, inputs), eval_batches, metric)
    batch = _score(lambda inputs: batch_mode(variables, inputs), eval_batches, metric)
    stale, message = verdict(running, precise, higher_is_better, tolerance)
    return Checkup(running, precise, batch, layer_gaps(variables["batch_stats"], precise_stats), stale, message)


def accuracy(logits: jax.Array, labels: jax.Array) -> float:
    """The fraction of examples whose largest logit is their label: a metric for checkup.

    Args:
      logits: (N, classes) model outputs.
      labels: (N,) integer labels.

    Returns:
      The accuracy, a float in [0, 1].
    """
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))
