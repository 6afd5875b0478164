"""The article sweep's workload in PyTorch, three ways, for
`benchmarks/accelerator_sweep.py` (never imported by the tests).

    eager       one run at a time, `torch.optim.Adam`, data on the device
    cudagraphs  the same with the net `torch.compile(mode="reduce-overhead")`d
                (CUDA graphs on a GPU) and a fused Adam where CUDA has one
    vmap        the runs of one architecture stacked with
                `torch.func.stack_module_state`, their train step
                `torch.func.vmap(torch.func.grad(...))` over the runs, and Adam
                written out over the stacked parameters (each run its own
                learning rate)

Every way does the same work per run: `steps` Adam steps at batch 32 (each
epoch its own shuffle), and at every evaluation the 10,000 test images with
the running averages and, on BN runs, again with precise BN statistics from
200 training batches (PyTorch's `update_bn` rule: momentum None in train mode).
`fraction` < 1 trains that share of each run's steps (and its evaluations);
the caller scales the time up and says so.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from benchmarks.peers import torch_model

WAYS = ("eager", "cudagraphs", "vmap")
PRECISE_BATCHES = 200


def _device_data(torch, data, device):
    def images(x):  # (N, 28, 28, 1) uint8 -> (N, 1, 28, 28) uint8 on the device
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)

    return (images(data.x_train), torch.from_numpy(data.y_train.astype(np.int64)).to(device),
            images(data.x_test), torch.from_numpy(data.y_test.astype(np.int64)).to(device))


def _orders(torch, seed, steps, num_train, device):
    """(steps, 32) training indices: a fresh shuffle every epoch."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_train // 32
    epochs = math.ceil(steps / per_epoch)
    order = torch.cat([torch.randperm(num_train, generator=generator)[:per_epoch * 32] for _ in range(epochs)])
    return order[:steps * 32].view(steps, 32).to(device)


def _floats(images):
    return images.float().div_(255.0)


def _eval_points(steps, eval_every):
    return {step for step in range(eval_every, steps + 1, eval_every)} | {steps}


# ---------------------------------------------------------------- one run at a time

def _evaluate(torch, model, test_images, test_labels):
    model.eval()
    correct = torch.zeros((), device=test_labels.device)
    with torch.no_grad():
        for first in range(0, len(test_labels), 1000):
            logits = model(_floats(test_images[first:first + 1000]))
            correct += (logits.argmax(-1) == test_labels[first:first + 1000]).sum()
    model.train()
    return correct


def _precise(torch, model, train_images, precise_indices, test_images, test_labels):
    """Accuracy with BN statistics re-estimated from the precise batches; the
    running averages are put back afterwards."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the equal-weight mean of the batches' statistics
    with torch.no_grad():
        for batch in precise_indices:
            model(_floats(train_images[batch]))
    correct = _evaluate(torch, model, test_images, test_labels)
    for m, (momentum, mean, var, count) in zip(norms, saved):
        m.momentum = momentum
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)
    return correct


def _one_run(torch, way, run, device_data, steps, eval_every, precise_indices, device):
    batch_norm, activation, learning_rate, seed = run
    train_images, train_labels, test_images, test_labels = device_data
    torch.manual_seed(seed)
    model, _ = torch_model(batch_norm, activation, learning_rate)
    model.to(device).train()
    fused = way == "cudagraphs" and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                 **({"fused": True} if fused else {}))
    forward = torch.compile(model, mode="reduce-overhead") if way == "cudagraphs" else model
    order = _orders(torch, seed, steps, len(train_labels), device)
    points = _eval_points(steps, eval_every)
    accuracies = []
    for step in range(steps):
        batch = order[step]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(_floats(train_images[batch])), train_labels[batch])
        loss.backward()
        optimizer.step()
        if step + 1 in points:
            correct = _evaluate(torch, model, test_images, test_labels)
            if batch_norm:
                _precise(torch, model, train_images, precise_indices, test_images, test_labels)
            accuracies.append(correct)
    return float(accuracies[-1]) / len(test_labels)


# ---------------------------------------------------------------- stacked runs

def _adam(torch, params, grads, moments, learning_rates, step):
    """Adam (b1 0.9, b2 0.999, eps 1e-8) on stacked parameters, each run with its learning rate."""
    bias_1, bias_2 = 1 - 0.9 ** step, 1 - 0.999 ** step
    with torch.no_grad():
        for name, param in params.items():
            m, v = moments[name]
            m.mul_(0.9).add_(grads[name], alpha=0.1)
            v.mul_(0.999).addcmul_(grads[name], grads[name], value=0.001)
            rate = learning_rates.view(-1, *([1] * (param.dim() - 1)))
            param.sub_(rate * (m / bias_1) / ((v / bias_2).sqrt() + 1e-8))


def _stacked_runs(torch, runs, device_data, steps, eval_every, precise_indices, device):
    """Runs of one architecture as one vmapped program."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    batch_norm, activation = runs[0][:2]
    train_images, train_labels, test_images, test_labels = device_data
    models = []
    for _, _, learning_rate, seed in runs:
        torch.manual_seed(seed)
        models.append(torch_model(batch_norm, activation, learning_rate)[0].to(device))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    norms = [m for m in base.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    learning_rates = torch.tensor([run[2] for run in runs], device=device)
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}
    orders = torch.stack([_orders(torch, run[3], steps, len(train_labels), device) for run in runs], 1)  # (steps, R, 32)

    def loss_of(run_params, run_buffers, images, labels):
        # BN's running statistics (run_buffers, one per run) are updated in place.
        logits = functional_call(base, (run_params, run_buffers), (images,))
        return torch.nn.functional.cross_entropy(logits, labels)

    train_step = vmap(grad(loss_of), in_dims=(0, 0, 0, 0))
    logits_of = vmap(lambda p, b, images: functional_call(base, (p, b), (images,)), in_dims=(0, 0, None))

    def evaluate():
        base.eval()
        correct = torch.zeros(len(runs), device=device)
        with torch.no_grad():
            for first in range(0, len(test_labels), 1000):
                logits = logits_of(params, buffers, _floats(test_images[first:first + 1000]))
                correct += (logits.argmax(-1) == test_labels[first:first + 1000]).sum(-1)
        base.train()
        return correct

    def precise():
        saved = {name: value.clone() for name, value in buffers.items()}
        for name, value in buffers.items():
            value.fill_(1.0 if name.endswith("running_var") else 0.0)
        with torch.no_grad():
            for count, batch in enumerate(precise_indices):
                for m in norms:  # 1 / (k + 1): the cumulative average of momentum None, without
                    m.momentum = 1.0 / (count + 1)  # reading the (batched) batch count under vmap
                logits_of(params, buffers, _floats(train_images[batch]))
        correct = evaluate()
        for m in norms:
            m.momentum = 0.01
        for name, value in buffers.items():
            value.copy_(saved[name])
        return correct

    points = _eval_points(steps, eval_every)
    accuracies = None
    base.train()
    for step in range(steps):
        batch = orders[step]  # (R, 32)
        grads = train_step(params, buffers, _floats(train_images[batch]), train_labels[batch])
        _adam(torch, params, grads, moments, learning_rates, step + 1)
        if step + 1 in points:
            accuracies = evaluate()
            if batch_norm:
                precise()
    return [float(a) / len(test_labels) for a in accuracies]


# ---------------------------------------------------------------- the workload

def run_workload(way: str, data, runs: list[tuple], total_steps: int, eval_every: int, fraction: float) -> dict:
    """Train `runs` [(batch_norm, activation, learning_rate, seed)] for
    `fraction` of `total_steps` each, `way`; return the seconds and accuracies.
    `setup_seconds`: the first run's first steps when they compile (cudagraphs);
    `measured_seconds`: everything after."""
    import torch

    if way not in WAYS:
        raise ValueError(f"unknown PyTorch way {way!r}; allowed: {', '.join(WAYS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    device_data = _device_data(torch, data, device)
    steps = max(1, round(total_steps * fraction))
    precise_indices = torch.from_numpy(np.random.default_rng(0).permutation(len(data.y_train))[:PRECISE_BATCHES * 32]
                                       ).view(PRECISE_BATCHES, 32).to(device)
    setup_seconds = 0.0
    if way == "cudagraphs":  # compile and capture once, outside the measured time (they are per architecture)
        start = time.perf_counter()
        for architecture in sorted({run[:2] for run in runs}):
            _one_run(torch, way, (*architecture, 0.001, 0), device_data, 3, 10**9, precise_indices[:1], device)
        sync()
        setup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if way == "vmap":
        accuracies = []
        for architecture in sorted({run[:2] for run in runs}):
            group = [run for run in runs if run[:2] == architecture]
            accuracies += _stacked_runs(torch, group, device_data, steps, eval_every, precise_indices, device)
    else:
        accuracies = [_one_run(torch, way, run, device_data, steps, eval_every, precise_indices, device)
                      for run in runs]
    sync()
    return {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
            "torch": torch.__version__, "steps_per_run": steps, "fraction": steps / total_steps,
            "setup_seconds": setup_seconds, "measured_seconds": time.perf_counter() - start,
            "mean_final_accuracy": float(np.mean(accuracies))}
