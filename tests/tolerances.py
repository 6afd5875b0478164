"""Tolerances for comparing two float32 computations of the same quantity,
derived from float32 round-off rather than from one machine's observed
differences: the CPU that runs the tests is not chosen (Intel Xeon, AMD EPYC
Zen 4, Zen 5), and XLA:CPU sums in another order on each (SSE, AVX2 and
AVX-512 lanes, another loop tiling), so the round-off differs from one to the
next.

The model. A float32 sum of n terms rounds each of its n additions by at most
half an ulp of the partial sum. Those rounding errors are independent and
cancel in part, so the error of the whole sum grows as sqrt(n) times the size
of the partial sums (the worst case, n times, is never approached in practice).
Two evaluations of the same sum in different orders differ by at most the sum
of their errors. So the tolerance of a sum of n terms whose partial sums are
at most `size` is

    sum_round_off(n, size) = ULPS * EPS32 * sqrt(n) * size

with EPS32 = 2**-23 (one ulp of 1.0). ULPS = 4 covers the two evaluations and
the tail of the error's distribution over many sums. Checked against what the
suite measures (`tests/tolerance_margins.py` records every comparison's
margin; 2026-12-03, an Intel Xeon with AVX-512, XLA also forced down to AVX2
and SSE 4.2; jax 0.7.1, 0.10.2 and 0.12): a convolution's sums come within
0.06 of sum_round_off (a quarter of it at ULPS = 1), and the closest
comparison built on this module within 0.24 of its tolerance (a BN output
over 10,816 values, SSE 4.2 code path).

Every tolerance here is far below what a wrong computation moves (another
epsilon, a missing term, one update more or fewer): the tests that use them
check that too, where it is not obvious.
"""

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 = 1.19e-7
ULPS = 4


def sum_round_off(terms: int, size) -> float:
    """Bound on the difference between two float32 evaluations of a sum of
    `terms` terms whose partial sums are at most `size` (see the module)."""
    return ULPS * EPS32 * math.sqrt(terms) * size


def _per_feature(x, axis):
    x = np.asarray(x, dtype=np.float64)
    axis = tuple(range(x.ndim - 1)) if axis is None else axis
    terms = math.prod(x.shape[a] for a in np.atleast_1d(axis))
    return x, axis, terms


def mean_round_off(x, axis=None):
    """Per feature (the last axis), the round-off of float32 means of `x` over
    `axis` (default: all but the last): a sum of n terms whose partial sums are
    at most n * mean|x|, divided by n."""
    x, axis, terms = _per_feature(x, axis)
    return sum_round_off(terms, np.abs(x).mean(axis=axis))


def variance_round_off(x, axis=None):
    """Per feature, the round-off of a float32 biased variance of `x` over
    `axis`, computed either way BN computes it: E[x^2] - E[x]^2 (a sum of n
    squares, partial sums up to n * E[x^2], minus the square of a mean carrying
    mean_round_off) or E[(x - E[x])^2]. The first is the larger; cancellation
    makes it large against the variance itself when |E[x]| >> std."""
    x, axis, terms = _per_feature(x, axis)
    mean_square = np.square(x).mean(axis=axis)
    return sum_round_off(terms, mean_square) + 2 * np.abs(x.mean(axis=axis)) * mean_round_off(x, axis)


def normalized_round_off(x, epsilon: float, axis=None):
    """Per element, the round-off of y = (x - mean) / sqrt(var + epsilon) with
    float32 batch statistics of `x` over `axis`: the mean's error divided by
    the std, the variance's error times |y| / (2 (var + epsilon)) (first order
    in d/dvar of var^-1/2), and a few ulps of y for the elementwise operations."""
    x64, axis, _ = _per_feature(x, axis)
    mean, var = x64.mean(axis=axis, keepdims=True), x64.var(axis=axis, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + epsilon)
    mean_error = np.expand_dims(mean_round_off(x64, axis), axis)
    var_error = np.expand_dims(variance_round_off(x64, axis), axis)
    return mean_error / np.sqrt(var + epsilon) + np.abs(y) * var_error / (2 * (var + epsilon)) + ULPS * EPS32 * np.abs(y)


def assert_within(actual, desired, tolerance, err_msg: str = ""):
    """|actual - desired| <= tolerance elementwise, `tolerance` an array
    (per element or per feature, broadcast) or a number. numpy < 2 cannot
    print an array atol in assert_allclose's message, hence this wrapper."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    tolerance = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), np.broadcast_shapes(actual.shape, desired.shape))
    excess = np.abs(actual - desired) - tolerance
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess[worst] <= 0, (
        f"{err_msg}{': ' if err_msg else ''}{int(np.sum(excess > 0))} of {excess.size} elements differ by more "
        f"than float32 round-off allows; worst at {tuple(int(i) for i in worst)}: {actual[worst]!r} against "
        f"{desired[worst]!r}, tolerance {tolerance[worst]:.3g}")
    # The same check as differences in units of the tolerance, so that
    # tests/tolerance_margins.py records how close it came (1.0 is the edge).
    with np.errstate(divide="ignore", invalid="ignore"):
        in_tolerances = np.where(tolerance > 0, np.abs(actual - desired) / tolerance, 0.0)
    np.testing.assert_allclose(in_tolerances, np.zeros_like(in_tolerances), rtol=0, atol=1.0, err_msg=err_msg)


def bn_round_off(x, axis=None):
    """Per feature, the relative round-off of everything a BN layer computes in
    train mode from the batch `x` (its output, its gradients, its new running
    statistics): its statistics sum the n values of a feature, and the
    cancellation in E[x^2] - E[x]^2 multiplies their error by 1 + mean^2 / var.
    Multiply by the largest value of what is compared, feature by feature."""
    x, axis, terms = _per_feature(x, axis)
    return sum_round_off(terms, 1 + np.square(x.mean(axis=axis)) / np.maximum(x.var(axis=axis), 1e-30))


def network_round_off(model, variables, *inputs, **apply_kwargs) -> float:
    """Relative bound on the difference between two float32 evaluations of a
    linen net (another convolution algorithm, compiled against op by op, NNX
    against linen, a batch split over devices), from the net itself, in train
    mode: multiply by the largest value of what is compared (logits, updated
    running statistics).

    Each layer with a kernel rounds each output by sum_round_off of its
    fan-in, relative to its output; each BN in train mode rounds its batch
    statistics over the n values of a feature, and its output carries that
    error times 1 + mean^2 / var (the cancellation in E[x^2] - E[x]^2, worst
    feature: bn_round_off). BN re-standardizes, so the relative errors of the
    layers add up along the net rather than multiply: the bound is their sum,
    ULPS * EPS32 * sum_i sqrt(n_i) * k_i. In eval mode BN computes no
    statistics, so this bounds it too.
    """
    import flax.linen as nn

    terms = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and args:
            if module.has_variable("params", "kernel"):
                kernel = module.get_variable("params", "kernel")
                terms.append(sum_round_off(kernel.size // kernel.shape[-1], 1.0))
            elif module.has_variable("batch_stats", "mean"):
                values = np.asarray(args[0], dtype=np.float64)
                terms.append(float(bn_round_off(values.reshape(-1, values.shape[-1])).max()))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, *inputs, train=True, mutable=["batch_stats"], **apply_kwargs)
    return float(sum(terms))


def feature_scale(value):
    """Per feature (the last axis), the largest |value|: what a relative bound per feature multiplies."""
    value = np.abs(np.asarray(value, dtype=np.float64))
    return value.reshape(-1, value.shape[-1]).max(axis=0) if value.ndim else value
