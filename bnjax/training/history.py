"""What a run records: its `History` (curves at each evaluation, times,
divergence), the divergence rule, and the callback that follows evaluations."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

from bnjax.support import host
from bnjax.training.config import TrainConfig

# A run has diverged when the mean training loss of an evaluation interval is
# not finite or above this: 100 x ln(10), a hundred times the cross-entropy of
# guessing among the 10 classes (a mean probability below e**-230 on the true
# class). No run in outputs/ that went on learning came near it (the highest
# finite interval mean there is 22.7); lr 1000 reaches 7e20 and stays there.
DIVERGED_LOSS = 100 * math.log(10)


def has_diverged(train_loss: float) -> bool:
    """The divergence rule: a training loss that is NaN, infinite or above `DIVERGED_LOSS`."""
    return not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS


def launch_record(loop: str, platform: str, devices: int, **details) -> dict:
    """What a run's numbers depend on besides its config and seed, as the
    loop that trains it says: the loop ("plain" or "engine"), the platform
    and number of devices, the CPU cores this process may use (XLA:CPU sizes
    its thread pool by them, and a sum split over other threads rounds
    otherwise), the XLA flags, and the loop's own details."""
    return {"loop": loop, "platform": platform, "devices": devices, "cpu_cores": host.usable_core_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), **details}


# on_eval(config, step, total_steps, record) after each evaluation of a run.
EvalCallback = Callable[[TrainConfig, int, int, dict], None]


@dataclasses.dataclass
class History:
    """Curves of one run; index i of every list belongs to `steps[i]`."""

    steps: list[int] = dataclasses.field(default_factory=list)
    val_accuracy: list[float] = dataclasses.field(default_factory=list)  # whole test set, running averages
    val_loss: list[float] = dataclasses.field(default_factory=list)
    # The same weights with other BN statistics, when the config's
    # eval_statistics asks (training/evaluation.py); empty otherwise.
    precise_val_accuracy: list[float] = dataclasses.field(default_factory=list)
    precise_val_loss: list[float] = dataclasses.field(default_factory=list)
    batch_val_accuracy: list[float] = dataclasses.field(default_factory=list)
    batch_val_loss: list[float] = dataclasses.field(default_factory=list)
    train_accuracy: list[float] = dataclasses.field(default_factory=list)  # mean since previous evaluation
    train_loss: list[float] = dataclasses.field(default_factory=list)
    wall_time_s: list[float] = dataclasses.field(default_factory=list)  # since the first step, compile included
    total_wall_time_s: float = 0.0  # of the whole program, shared by the runs trained together
    eval_time_s: float = 0.0  # evaluations with the running averages
    eval_statistics_time_s: float = 0.0  # evaluations with precise or batch statistics (precise BN included)
    diverged: bool = False
    probes: list[dict] = dataclasses.field(default_factory=list)  # `probe(state)` at each evaluation, if given
    # How the convolutions and matrix products were computed on the backend
    # that trained the run (`effective_precision`).
    precision: str = ""
    # How the run was launched, which its float round-off depends on besides
    # config and seed (`launch_record`): the loop, the strategy and the other
    # runs of its program, devices, CPU cores, XLA flags.
    launch: dict = dataclasses.field(default_factory=dict)

    def append(self, record: dict) -> None:
        """Add one evaluation: `record` maps curve names (the list fields above) to their values at it."""
        for curve, value in record.items():
            getattr(self, curve).append(value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
