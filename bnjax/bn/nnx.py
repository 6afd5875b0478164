"""bnjax's BN for Flax NNX: `bnjax.nnx.BatchNorm` is `flax.nnx.BatchNorm`
(its constructor, its call, its `BatchStat` and `Param` variables, its
`train()` / `eval()` / `nnx.view` switching; it subclasses it) with bnjax's
variants as extra keyword-only arguments, computed by the same functions as
the linen `bnjax.BatchNorm` (`bnjax.bn.batchnorm.forward`).

NNX keeps state inside the module: in train mode a call writes the new
running averages into the layer's `mean` and `var` (and, for the variants
that need them, `count`, `std`, `renorm_mean`, `renorm_std`) in place.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import canonicalize_dtype

from bnjax.bn.batchnorm import Renorm, broadcast_features, check_call, check_settings, forward
from bnjax.bn.checkup import Checkup, _score, check_tolerance, layer_gaps, verdict
from bnjax.bn.update_bn import average, check_variance, gather

VARIANTS = dict(running_average="ema", unbiased_running_var=False, renorm=None, frozen=False, ghost_batch_size=None)


class BatchNorm(nnx.BatchNorm):
    """`flax.nnx.BatchNorm(num_features, *, ..., rngs)` plus, keyword-only,
    `running_average`, `unbiased_running_var`, `renorm`, `frozen` and
    `ghost_batch_size` (bnjax.BatchNorm's docstring says what each does).
    Every setting is checked here, when the layer is made."""

    def __init__(self, num_features: int, *, running_average: str = "ema", unbiased_running_var: bool = False,
                 renorm: Renorm | None = None, frozen: bool = False, ghost_batch_size: int | None = None,
                 **flax_arguments):
        super().__init__(num_features, **flax_arguments)
        self.running_average, self.unbiased_running_var = running_average, unbiased_running_var
        self.renorm, self.frozen, self.ghost_batch_size = renorm, frozen, ghost_batch_size
        check_settings(types.SimpleNamespace(
            **{name: getattr(self, name) for name in ("use_running_average", "axis", "momentum", "epsilon", "dtype",
                                                      "param_dtype", "use_bias", "use_scale", *VARIANTS)},
            use_fast_variance=self.use_fast_variance, force_float32_reductions=True,
            bias_init=flax_arguments.get("bias_init", jnp.zeros), scale_init=flax_arguments.get("scale_init",
                                                                                                jnp.ones)))
        if running_average != "ema" or renorm is not None:  # updates so far
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        if renorm is not None:
            self.std = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
            self.renorm_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
            self.renorm_std = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        if use_running_average is None:
            raise ValueError("use_running_average must be given: to the constructor, at the call, or by "
                             "model.train() / model.eval() / nnx.view")
        check_call(self, x, use_running_average, mask)
        names = [name for name in ("mean", "var", "count", "std", "renorm_mean", "renorm_std") if hasattr(self, name)]
        running = {name: getattr(self, name)[...] for name in names}
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        read = running  # what the call normalizes with in eval mode
        promote = getattr(self, "promote_dtype", None)  # flax >= 0.12.4 promotes inputs and state together
        if promote is not None:  # ... for the call; the update averages into the state as it is
            x, mean, var, scale, bias = promote((x, running["mean"], running["var"], scale, bias), dtype=self.dtype)
            read = {**running, "mean": mean, "var": var}
        feature_axes = (self.axis % x.ndim,)
        reduction_axes = tuple(axis for axis in range(x.ndim) if axis not in feature_axes)
        scale, bias = (None if value is None else broadcast_features(value, reduction_axes) for value in (scale, bias))
        y, new_running = forward(self, x, scale, bias, read if use_running_average or self.frozen else running,
                                 use_running_average, mask, self.axis_name)
        if new_running is not None:  # train mode: the running statistics change here, in place
            for name in names:
                getattr(self, name)[...] = jax.lax.stop_gradient(new_running[name])
        return jnp.asarray(y, canonicalize_dtype(*(value for value in (x, scale, bias) if value is not None),
                                                 dtype=self.dtype))


def update_bn(model: nnx.Module, batches: Iterable[Any], *, variance: str = "batch_average",
              **call_kwargs: Any) -> dict:
    """Precise BN for an NNX model whose BN layers are bnjax's or flax's: each
    layer's `mean` and `var` re-estimated for the model's current weights from
    `batches` (any iterable of what the model takes first), written into the
    model in place, as `torch.optim.swa_utils.update_bn` does, and returned as
    {path: {"mean", "var"}}. `call_kwargs` go to every call.

    A copy of the model runs each batch in train mode with every BN's momentum
    at 0 (its running statistics become exactly that batch's, under its own
    variance convention); the per-batch statistics are averaged as
    `bnjax.update_bn` averages them (`variance`)."""
    check_variance(variance)
    probe = nnx.clone(model)  # its own variables: the model changes only where the averages are written
    layers = {path: layer for path, layer in nnx.iter_graph(probe) if isinstance(layer, nnx.BatchNorm)}
    if not layers:
        raise ValueError("update_bn needs a model with BN layers; this one has none")
    for layer in layers.values():
        layer.momentum, layer.use_running_average = 0.0, False
        if isinstance(layer, BatchNorm):  # one batch's statistics, whole, whatever the variant
            layer.running_average, layer.frozen, layer.ghost_batch_size = "ema", False, None

    @nnx.jit
    def one_batch(probe, batch):
        probe(batch, **call_kwargs)
        return {path: (layer.mean[...], layer.var[...]) for path, layer in nnx.iter_graph(probe)
                if isinstance(layer, nnx.BatchNorm)}

    per_layer = gather(batches, lambda batch: one_batch(probe, batch))
    if not per_layer:
        raise ValueError("update_bn found no batches to average (an empty iterable)")
    originals = {path: layer for path, layer in nnx.iter_graph(model) if isinstance(layer, nnx.BatchNorm)}
    for path, per_batch in per_layer.items():
        # With momentum 0 a train-mode call writes the batch's statistics; a layer whose mean and
        # variance both came back exactly as they were ran in eval mode (use_running_average=True
        # at its call), and its numbers would silently be the running averages'.
        mean, var = per_batch[0]
        unchanged = jnp.array_equal(mean, originals[path].mean[...]) & jnp.array_equal(var, originals[path].var[...])
        if bool(unchanged):
            raise ValueError(f"update_bn runs the model in train mode, but its BN layer {'/'.join(map(str, path))} "
                             "kept its running statistics (it ran in eval mode: use_running_average=True at its "
                             "call); call the model so that its BN layers use batch statistics")
    result = {}
    for path, per_batch in per_layer.items():
        mean, var = average(per_batch, variance)
        originals[path].mean[...], originals[path].var[...] = mean, var
        result[path] = {"mean": mean, "var": var}
    return result


def _copy_in_mode(model, use_running_average: bool):
    """A copy of `model` (its own variables, the same values) with every BN in eval or train mode."""
    copy = nnx.clone(model)
    for _, layer in nnx.iter_graph(copy):
        if isinstance(layer, nnx.BatchNorm):
            layer.use_running_average = use_running_average
    return copy


def checkup(model: nnx.Module, train_batches: Iterable[Any], eval_batches: Iterable[tuple[Any, Any]],
            metric: Callable[[Any, Any], float], *, higher_is_better: bool = True, tolerance: float = 0.005,
            **call_kwargs: Any) -> Checkup:
    """`bnjax.checkup` for an NNX model (bnjax's or flax's BN layers): the
    metric with the running averages, with precise statistics and with each
    evaluation batch's own, every BN layer's gap, and the verdict. The model
    itself is left as it is."""
    check_tolerance(tolerance)
    eval_batches = list(eval_batches)
    precise_model = _copy_in_mode(model, True)
    update_bn(precise_model, train_batches, **call_kwargs)
    scores = []
    for scored in (_copy_in_mode(model, True), precise_model, _copy_in_mode(model, False)):
        call = nnx.jit(lambda scored, inputs: scored(inputs, **call_kwargs))
        scores.append(_score(lambda inputs: call(scored, inputs), eval_batches, metric))

    def statistics(of):
        return {"/".join(str(name) for name in path): {"mean": layer.mean[...], "var": layer.var[...]}
                for path, layer in nnx.iter_graph(of) if isinstance(layer, nnx.BatchNorm)}

    stale, message = verdict(scores[0], scores[1], higher_is_better, tolerance)
    return Checkup(*scores, layer_gaps(statistics(model), statistics(precise_model)), stale, message)
