"""bnjax's BatchNorm in your own NNX training loop: an `nnx.Module` with
`bnjax.nnx.BatchNorm` where it would have `nnx.BatchNorm`, trained with
`nnx.Optimizer` and `nnx.jit`, then precise BN (`bnjax.nnx.update_bn`, written
into the model in place) and the check-up (`bnjax.nnx.checkup`).

    python examples/nnx_optimizer.py                # ~300 steps on MNIST, about a minute on a laptop CPU
"""

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bnjax
from bnjax.nnx import BatchNorm, checkup, update_bn


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = BatchNorm(32, momentum=0.9, rngs=rngs)  # was nnx.BatchNorm
        self.conv2 = nnx.Conv(32, 64, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = BatchNorm(64, momentum=0.9, rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 64, 128, use_bias=False, rngs=rngs)
        self.norm3 = BatchNorm(128, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.norm1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.norm2(self.conv2(x))), (2, 2), (2, 2))
        x = nnx.relu(self.norm3(self.dense1(x.reshape(x.shape[0], -1))))
        return self.dense2(x)


@nnx.jit
def train_step(model, optimizer, images, labels):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    data = bnjax.load_mnist()
    train_images = data.x_train.astype(np.float32) / 255.0
    test_images = data.x_test[:2000].astype(np.float32) / 255.0
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    model.train()  # BN with batch statistics, its running averages moving
    order = np.random.default_rng(0).permutation(len(train_images))
    for step in range(args.steps):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        loss = train_step(model, optimizer, jnp.asarray(train_images[batch]), jnp.asarray(data.y_train[batch]))
    print(f"trained {args.steps} steps, last loss {float(loss):.4f}")

    model.eval()
    train_batches = [train_images[i:i + 500] for i in range(0, 5000, 500)]
    eval_batches = [(test_images[i:i + 500], data.y_test[i:i + 500]) for i in range(0, len(test_images), 500)]
    print(checkup(model, train_batches, eval_batches, bnjax.accuracy))
    update_bn(model, train_batches)  # the model's running statistics become precise ones, in place
    logits = model(jnp.asarray(test_images))
    print(f"test accuracy with precise BN statistics: {float(jnp.mean(logits.argmax(-1) == data.y_test[:2000])):.4f}")


if __name__ == "__main__":
    main()
