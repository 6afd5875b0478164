"""Santurkar et al.'s deep linear network (bnjax/nets/linear.py: 25 Dense
layers of 10 units, no nonlinearity; with BN, Dense -> BatchNorm on each
hidden layer), trained by full-batch gradient descent on Gaussian data
(x ~ N(0, I), y = x A^T, EXAMPLES examples), where the paper's
internal-covariate-shift result is strongest. Part of
`python -m experiments.why_bn_works`, which calls `run`.

Each seed draws its own data and initialization (the same for the plain and
the BN net). The loss is half the squared error summed over outputs, mean
over examples, in train mode: BN normalizes by the full batch's statistics.
Every MEASURE_EVERY steps, from step 0: the loss and, for each layer above
the first, ICS as the paper defines it (`gradient_shift`: the layer's
gradient before and after the layers below take the same descent step).

The paper's learning rates and data size are not in what we have of it; here
LEARNING_RATES: 0.01, the largest of 0.01, 0.05, 0.1, 0.3 at which the plain
net does not diverge (at 0.05 its loss is NaN within 200 steps), and 0.001.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.nets.linear import DeepLinearNet, gaussian_regression
from bnjax.support.atomic import write_json
from bnjax.support.provenance import environment
from bnjax.training.landscape import gradient_shift

DEPTH, EXAMPLES, STEPS, MEASURE_EVERY = 25, 1000, 1000, 50
LEARNING_RATES = (0.001, 0.01)


def _loss_fn(model: DeepLinearNet, batch_stats, x, y):
    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats is not None else {})}
        prediction = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        return 0.5 * jnp.mean(jnp.sum(jnp.square(prediction - y), axis=-1))
    return loss_fn


def _descend(model, learning_rate, params, batch_stats, x, y):
    """One full-batch gradient descent step."""
    grads = jax.grad(_loss_fn(model, batch_stats, x, y))(params)
    return jax.tree_util.tree_map(lambda value, grad: value - learning_rate * grad, params, grads)


_descend_jitted = jax.jit(_descend, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _measure(model, learning_rate, params, batch_stats, x, y):
    """(loss, ICS per layer over the step, the next parameters)."""
    next_params = _descend(model, learning_rate, params, batch_stats, x, y)
    shifts = gradient_shift(_loss_fn(model, batch_stats, x, y), params, next_params, model.layer_groups())
    return _loss_fn(model, batch_stats, x, y)(params), shifts, next_params


def train(batch_norm: bool, learning_rate: float, seed: int, steps: int = STEPS) -> dict:
    """One run: {"steps", "loss", "ics": {measure: {layer: [values]}}}."""
    model = DeepLinearNet(depth=DEPTH, batch_norm=batch_norm)
    data_key, init_key = jax.random.split(jax.random.key(seed))
    x, y = gaussian_regression(data_key, EXAMPLES)
    variables = model.init(init_key, x, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats")
    rate = jnp.float32(learning_rate)
    record = {"steps": [], "loss": [], "ics": {"l2": {}, "cosine": {}, "relative": {}}}
    for step in range(steps + 1):
        if step % MEASURE_EVERY == 0 or step == steps:
            loss, shifts, next_params = _measure(model, rate, params, batch_stats, x, y)
            record["steps"].append(step)
            record["loss"].append(float(loss))
            for layer in [group[0] for group in model.layer_groups()[1:]]:  # by depth (a jitted dict comes sorted)
                for name, value in shifts[layer].items():
                    record["ics"][name].setdefault(layer, []).append(float(value))
        else:
            next_params = _descend_jitted(model, rate, params, batch_stats, x, y)
        params = next_params
    return record


def run(path: Path, seeds: int, max_steps: int | None = None) -> dict:
    """Every (learning rate, net, seed) of the module doc, saved to `path`
    (JSON, written atomically; rerun only if it is missing or of another size)."""
    steps = min(STEPS, max_steps or STEPS)
    if Path(path).exists():
        saved = json.loads(Path(path).read_text())
        if saved.get("seeds") == seeds and saved.get("steps") == steps:
            print(f"deep linear network: already in {path}", flush=True)
            return saved
    start = time.perf_counter()
    runs = []
    for learning_rate in LEARNING_RATES:
        for batch_norm in (False, True):
            for seed in range(seeds):
                runs.append({"learning_rate": learning_rate, "batch_norm": batch_norm, "seed": seed,
                             **train(batch_norm, learning_rate, seed, steps)})
            finals = [run["loss"][-1] for run in runs[-seeds:]]
            print(f"deep linear network: lr {learning_rate} {'BN' if batch_norm else 'plain'}: final loss "
                  f"{np.nanmean(finals):.4g} (mean of {seeds} seeds)", flush=True)
    results = {"depth": DEPTH, "width": 10, "examples": EXAMPLES, "steps": steps, "measure_every": MEASURE_EVERY,
               "seeds": seeds,
               "minutes": round((time.perf_counter() - start) / 60, 2), "environment": environment(), "runs": runs}
    write_json(path, results)
    return results
