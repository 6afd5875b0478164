"""Move BN layers and whole ConvNets between PyTorch, Keras and bnjax.

Conventions that differ (and that these functions translate):

| | Keras | PyTorch | Flax / bnjax |
|---|---|---|---|
| `momentum` weights | the old running value (0.99) | the new batch value (0.1) | the old running value (0.99) |
| default epsilon | 1e-3 | 1e-5 | 1e-5 (Flax), 1e-3 (bnjax, as Keras) |
| running variance tracks | biased batch variance | unbiased (N - 1) batch variance | biased |
| BN names | gamma, beta, moving_mean, moving_variance | weight, bias, running_mean, running_var (+ num_batches_tracked) | params: scale, bias; batch_stats: mean, var |
| conv kernel layout | HWIO | OIHW | HWIO |
| dense kernel layout | (in, out) | (out, in) | (in, out) |
| flatten order | H, W, C (NHWC) | C, H, W (NCHW) | H, W, C |

So PyTorch `momentum=0.1` is Keras/Flax `momentum=0.9`, and a PyTorch net's
running variance is only reproduced with `unbiased_running_var=True`.

Arrays are numpy in and out: torch tensors go through `.numpy()`, Keras
weights come from `model.get_weights()` and go back with `model.set_weights()`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bnjax.bn.batchnorm import BatchNorm

# The ConvNet's Conv/Dense layers in call order, with each BN's Flax name.
CONVNET_LAYERS = ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1")
# The first Dense reads the flattened (3, 3, 64) output of the last conv.
FLATTEN_SHAPE_HWC = (3, 3, 64)


def momentum_from_torch(torch_momentum: float) -> float:
    """PyTorch's momentum weights the new batch value; Keras/Flax's the old running one."""
    if not 0.0 <= torch_momentum <= 1.0:
        raise ValueError(f"PyTorch momentum must be in [0, 1], got {torch_momentum!r}")
    return 1.0 - torch_momentum


def momentum_to_torch(momentum: float) -> float:
    return 1.0 - momentum


def torch_batch_norm(momentum: float = 0.1, eps: float = 1e-5) -> BatchNorm:
    """The BatchNorm that behaves like `torch.nn.BatchNorm2d(momentum, eps)`: a net's `bn=`."""
    return BatchNorm(momentum=momentum_from_torch(momentum), epsilon=eps, unbiased_running_var=True)


def keras_batch_norm(momentum: float = 0.99, epsilon: float = 1e-3) -> BatchNorm:
    """The BatchNorm of `keras.layers.BatchNormalization(momentum, epsilon)` (same meaning): a net's `bn=`."""
    return BatchNorm(momentum=momentum, epsilon=epsilon)


# ------------------------------------------------------------------ one BN layer

def bn_from_torch(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """A BatchNorm{1,2}d state (weight, bias, running_mean, running_var) -> (params, batch_stats)."""
    return (
        {"scale": _f32(state["weight"]), "bias": _f32(state["bias"])},
        {"mean": _f32(state["running_mean"]), "var": _f32(state["running_var"])},
    )


def bn_to_torch(params: Mapping, batch_stats: Mapping, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    return {
        "weight": _f32(params["scale"]),
        "bias": _f32(params["bias"]),
        "running_mean": _f32(batch_stats["mean"]),
        "running_var": _f32(batch_stats["var"]),
        "num_batches_tracked": np.asarray(num_batches_tracked, np.int64),
    }


def bn_from_keras(weights) -> tuple[dict, dict]:
    """Keras BatchNormalization weights [gamma, beta, moving_mean, moving_variance] -> (params, batch_stats)."""
    gamma, beta, moving_mean, moving_variance = weights
    return {"scale": _f32(gamma), "bias": _f32(beta)}, {"mean": _f32(moving_mean), "var": _f32(moving_variance)}


def bn_to_keras(params: Mapping, batch_stats: Mapping) -> list[np.ndarray]:
    return [_f32(params["scale"]), _f32(params["bias"]), _f32(batch_stats["mean"]), _f32(batch_stats["var"])]


# ------------------------------------------------------------------ kernels

def conv_kernel_from_torch(weight) -> np.ndarray:
    """(out, in, h, w) -> (h, w, in, out)."""
    return _f32(weight).transpose(2, 3, 1, 0)


def conv_kernel_to_torch(kernel) -> np.ndarray:
    return _f32(kernel).transpose(3, 2, 0, 1)


def dense_kernel_from_torch(weight, flattened_from_chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """(out, in) -> (in, out). If the input is a flattened NCHW map of shape
    (c, h, w) in PyTorch, its rows are reordered to NHWC flatten order."""
    weight = _f32(weight)
    if flattened_from_chw is not None:
        c, h, w = flattened_from_chw
        return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return weight.T


def dense_kernel_to_torch(kernel, flattened_to_chw: tuple[int, int, int] | None = None) -> np.ndarray:
    kernel = _f32(kernel)
    if flattened_to_chw is not None:
        c, h, w = flattened_to_chw
        return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
    return kernel.T


# ------------------------------------------------------------------ whole ConvNet

def _torch_modules(state_dict: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Group a state_dict's entries by module, in registration (= call) order."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        modules.setdefault(prefix, {})[name] = np.asarray(value)
    return list(modules.values())


def convnet_from_torch(state_dict: Mapping[str, np.ndarray], batch_norm: bool) -> dict:
    """A PyTorch state_dict of the article's net (Conv2d/Linear, each followed by
    BatchNorm when `batch_norm`, registered in call order; any module names) ->
    bnjax ConvNet variables. Build the ConvNet with `bn=torch_batch_norm(...)`."""
    modules = _torch_modules(state_dict)
    expected = len(CONVNET_LAYERS) * (2 if batch_norm else 1)
    if len(modules) != expected:
        raise ValueError(f"state_dict has {len(modules)} modules; the {'BN' if batch_norm else 'plain'} ConvNet has {expected}")
    params, batch_stats = {}, {}
    step = 2 if batch_norm else 1
    for index, layer in enumerate(CONVNET_LAYERS):
        module = modules[index * step]
        if layer.startswith("Conv"):
            params[layer] = {"kernel": conv_kernel_from_torch(module["weight"])}
        else:
            flattened = (FLATTEN_SHAPE_HWC[2], *FLATTEN_SHAPE_HWC[:2]) if layer == "Dense_0" else None
            params[layer] = {"kernel": dense_kernel_from_torch(module["weight"], flattened)}
        if "bias" in module:
            params[layer]["bias"] = _f32(module["bias"])
        if batch_norm:
            name = f"BatchNorm_{index}"
            params[name], batch_stats[name] = bn_from_torch(modules[index * step + 1])
    return {"params": params, "batch_stats": batch_stats} if batch_norm else {"params": params}


def convnet_to_torch(variables: Mapping, module_names: list[str]) -> dict[str, np.ndarray]:
    """bnjax ConvNet variables -> a PyTorch state_dict whose modules are named
    `module_names` in call order (e.g. `list(dict(torch_model.named_children()))`)."""
    params = variables["params"]
    batch_norm = "batch_stats" in variables
    names = iter(module_names)
    state_dict = {}
    for index, layer in enumerate(CONVNET_LAYERS):
        prefix = next(names)
        if layer.startswith("Conv"):
            state_dict[f"{prefix}.weight"] = conv_kernel_to_torch(params[layer]["kernel"])
        else:
            flattened = (FLATTEN_SHAPE_HWC[2], *FLATTEN_SHAPE_HWC[:2]) if layer == "Dense_0" else None
            state_dict[f"{prefix}.weight"] = dense_kernel_to_torch(params[layer]["kernel"], flattened)
        if "bias" in params[layer]:
            state_dict[f"{prefix}.bias"] = _f32(params[layer]["bias"])
        if batch_norm:
            bn_prefix, name = next(names), f"BatchNorm_{index}"
            for key, value in bn_to_torch(params[name], variables["batch_stats"][name]).items():
                state_dict[f"{bn_prefix}.{key}"] = value
    return state_dict


def convnet_from_keras(weights: list, batch_norm: bool) -> dict:
    """`keras_model.get_weights()` of the article's net -> bnjax ConvNet variables.

    Keras's layouts are Flax's (HWIO kernels, NHWC flatten), so this only names
    the arrays: per layer, kernel[, bias], then gamma, beta, moving_mean,
    moving_variance of its BN."""
    weights = list(weights)
    expected = len(CONVNET_LAYERS) * (5 if batch_norm else 2)
    if len(weights) != expected:
        raise ValueError(f"got {len(weights)} Keras weight arrays; the {'BN' if batch_norm else 'plain'} "
                         f"ConvNet has {expected}")
    params, batch_stats = {}, {}
    for index, layer in enumerate(CONVNET_LAYERS):
        params[layer] = {"kernel": _f32(weights.pop(0))}
        if not batch_norm:
            params[layer]["bias"] = _f32(weights.pop(0))
        else:
            name = f"BatchNorm_{index}"
            params[name], batch_stats[name] = bn_from_keras([weights.pop(0) for _ in range(4)])
    return {"params": params, "batch_stats": batch_stats} if batch_norm else {"params": params}


def convnet_to_keras(variables: Mapping) -> list[np.ndarray]:
    """bnjax ConvNet variables -> the list for `keras_model.set_weights()`."""
    params, weights = variables["params"], []
    for index, layer in enumerate(CONVNET_LAYERS):
        weights.append(_f32(params[layer]["kernel"]))
        if "bias" in params[layer]:
            weights.append(_f32(params[layer]["bias"]))
        if "batch_stats" in variables:
            name = f"BatchNorm_{index}"
            weights.extend(bn_to_keras(params[name], variables["batch_stats"][name]))
    return weights


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)
