"""The article's CNN in Keras 3 (TensorFlow backend) and in PyTorch, for side-by-side
timing only. Same architecture as `bnjax.nets.models.ConvNet` (BN nets: no biases, BN
before the activation, BN on the output layer too), Adam (lr, b1 0.9, b2 0.999,
eps 1e-8), batch 32, BN momentum 0.99 / epsilon 1e-3 in each framework's own
convention (PyTorch: momentum 0.01). Imported only when the peer is installed
(`pip install -e ".[peers]"`); never by the tests.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np


def available() -> dict[str, str | None]:
    """{peer: None if usable, else why not}."""
    reasons = {}
    for peer, modules in (("keras-tf", ("keras", "tensorflow")), ("pytorch", ("torch",))):
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        reasons[peer] = f"{', '.join(missing)} not installed" if missing else None
    return reasons


# ---------------------------------------------------------------- Keras 3 on TensorFlow

def keras_model(batch_norm: bool, activation: str = "relu", learning_rate: float = 0.001):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    layers = [keras.Input((28, 28, 1))]

    def unit(layer, hidden):
        layers.append(layer)
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3))
        if hidden:
            layers.append(keras.layers.Activation(activation))

    unit(keras.layers.Conv2D(32, 3, use_bias=not batch_norm), True)
    layers.append(keras.layers.MaxPooling2D(2))
    unit(keras.layers.Conv2D(64, 3, use_bias=not batch_norm), True)
    layers.append(keras.layers.MaxPooling2D(2))
    unit(keras.layers.Conv2D(64, 3, use_bias=not batch_norm), True)
    layers.append(keras.layers.Flatten())
    unit(keras.layers.Dense(64, use_bias=not batch_norm), True)
    unit(keras.layers.Dense(10, use_bias=not batch_norm), False)
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def keras_train_seconds(model, images: np.ndarray, labels: np.ndarray, steps: int) -> float:
    start = time.perf_counter()
    model.fit(images[: steps * 32], labels[: steps * 32], batch_size=32, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def keras_run(images, labels, test_images, test_labels, batch_norm, activation, learning_rate, epochs):
    """One article run in Keras, evaluated at the end of each epoch (3 points per curve)."""
    model = keras_model(batch_norm, activation, learning_rate)
    history = model.fit(images, labels, batch_size=32, epochs=epochs, shuffle=False, verbose=0,
                        validation_data=(test_images, test_labels), validation_batch_size=1000)
    return history.history["val_accuracy"]


# ---------------------------------------------------------------- PyTorch (eager)

def torch_model(batch_norm: bool, activation: str = "relu", learning_rate: float = 0.001):
    import torch
    from torch import nn

    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    layers = []

    def unit(layer, features, hidden, conv):
        layers.append(layer)
        if batch_norm:
            bn = nn.BatchNorm2d if conv else nn.BatchNorm1d
            layers.append(bn(features, momentum=0.01, eps=1e-3))  # PyTorch's momentum = 1 - Keras's
        if hidden:
            layers.append(act())

    unit(nn.Conv2d(1, 32, 3, bias=not batch_norm), 32, True, True)
    layers.append(nn.MaxPool2d(2))
    unit(nn.Conv2d(32, 64, 3, bias=not batch_norm), 64, True, True)
    layers.append(nn.MaxPool2d(2))
    unit(nn.Conv2d(64, 64, 3, bias=not batch_norm), 64, True, True)
    layers.append(nn.Flatten())
    unit(nn.Linear(576, 64, bias=not batch_norm), 64, True, False)
    unit(nn.Linear(64, 10, bias=not batch_norm), 10, False, False)
    model = nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    return model, optimizer


def torch_train_seconds(model_and_optimizer, images: np.ndarray, labels: np.ndarray, steps: int, device="cpu") -> float:
    import torch

    model, optimizer = model_and_optimizer
    model.to(device).train()
    x = torch.from_numpy(images[: steps * 32]).permute(0, 3, 1, 2).float().div(255.0).to(device)  # NCHW
    y = torch.from_numpy(labels[: steps * 32]).long().to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for step in range(steps):
        batch = slice(step * 32, step * 32 + 32)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start
