"""bnjax's BatchNorm in your own linen training loop, the way flax's BatchNorm
guide trains one: flax's TrainState with a `batch_stats` field, a jitted step
that applies the model with `mutable=["batch_stats"]`, then precise BN
(`bnjax.update_bn`) and the check-up (`bnjax.checkup`).

    python examples/linen_train_state.py            # ~300 steps on MNIST, about a minute on a laptop CPU

The only line that is bnjax's rather than flax's is the `norm` partial.
"""

import argparse
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import bnjax


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(bnjax.BatchNorm, use_running_average=not train, momentum=0.9)  # was nn.BatchNorm
        x = nn.relu(norm()(nn.Conv(32, (3, 3), use_bias=False)(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(norm()(nn.Conv(64, (3, 3), use_bias=False)(x)))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(norm()(nn.Dense(128, use_bias=False)(x)))
        return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any


@jax.jit
def train_step(state, images, labels):
    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                         mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"]), loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    data = bnjax.load_mnist()
    train_images = data.x_train.astype(np.float32) / 255.0
    test_images = data.x_test[:2000].astype(np.float32) / 255.0
    model = CNN()
    variables = model.init(jax.random.key(0), train_images[:1], train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(1e-3),
                              batch_stats=variables["batch_stats"])
    order = np.random.default_rng(0).permutation(len(train_images))
    for step in range(args.steps):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        state, loss = train_step(state, train_images[batch], data.y_train[batch])
    print(f"trained {args.steps} steps, last loss {float(loss):.4f}")

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_batches = [train_images[i:i + 500] for i in range(0, 5000, 500)]
    precise = bnjax.update_bn(model, variables, train_batches, train=True)
    eval_batches = [(test_images[i:i + 500], data.y_test[i:i + 500]) for i in range(0, len(test_images), 500)]
    print(bnjax.checkup(model, variables, train_batches, eval_batches, bnjax.accuracy,
                        train_kwargs={"train": True}, eval_kwargs={"train": False}))
    logits = model.apply({**variables, "batch_stats": precise}, test_images, train=False)
    print(f"test accuracy with precise BN statistics: {float(jnp.mean(logits.argmax(-1) == data.y_test[:2000])):.4f}")


if __name__ == "__main__":
    main()
