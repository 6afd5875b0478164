"""Which examples each step of a run sees: the data set's shape checked, the
steps per epoch and in all, and each epoch's order of the training set."""

from __future__ import annotations

import numpy as np

from bnjax.training.config import TrainConfig


def check_dataset(data) -> None:
    """Raise a ValueError naming the problem unless `data` holds (N, H, W, C)
    uint8 images and (N,) integer labels in 0..9 for both splits."""
    for split in ("train", "test"):
        images, labels = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"x_{split} must be (N, height, width, channels) uint8, got {images.shape} {images.dtype}")
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"y_{split} must be ({images.shape[0]},) integers, got {labels.shape} {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"y_{split} must hold class indices 0..9, got values {labels.min()}..{labels.max()}")


def epoch_order(config: TrainConfig, epoch: int, num_examples: int) -> np.ndarray:
    """Indices of the training set in the order one epoch visits them."""
    if not config.shuffle:
        return np.arange(num_examples, dtype=np.int32)
    rng = np.random.default_rng([config.seed, epoch])
    return rng.permutation(num_examples).astype(np.int32)


def resolve_steps(config: TrainConfig, num_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) for a training set of `num_examples`."""
    one_pass = num_examples // config.batch_size
    if one_pass < 1:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({num_examples} examples)")
    steps_per_epoch = config.steps_per_epoch or one_pass
    if steps_per_epoch > one_pass:
        raise ValueError(
            f"steps_per_epoch {steps_per_epoch} needs {steps_per_epoch * config.batch_size} examples per epoch; "
            f"the training set has {num_examples} (at most {one_pass} steps of {config.batch_size})"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return steps_per_epoch, total_steps
