"""A run's curves as TensorBoard event files, written through tensorboardX
(which needs no TensorFlow), for `tensorboard --logdir` or Colab's
`%tensorboard`. The results JSON stays the record of truth; these files are
how TensorBoard users open it.

Each evaluation becomes scalars at its step, one chart per measure with a
line per kind of BN statistics:

    accuracy/train          the mean over the steps since the last evaluation (train mode)
    accuracy/test_running   the test set with BN's running averages (eval mode)
    accuracy/test_precise   ... with precise BN statistics (eval_statistics "precise")
    accuracy/test_batch     ... with each test batch's own statistics (eval_statistics "batch")
    loss/...                the same for the loss
    time/wall_s             seconds since the run's first step

and the run's config goes in as hyperparameters (TensorBoard's HParams tab),
with its final test accuracy as the metric. tensorboardX comes with the
`experiments` extra; without it, asking for a log fails in one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from bnjax.training.config import TrainConfig, settings_by_name
from bnjax.training.history import History

# Each History / record field and the TensorBoard tag it is written as.
TAGS = {"train_accuracy": "accuracy/train", "val_accuracy": "accuracy/test_running",
        "precise_val_accuracy": "accuracy/test_precise", "batch_val_accuracy": "accuracy/test_batch",
        "train_loss": "loss/train", "val_loss": "loss/test_running", "precise_val_loss": "loss/test_precise",
        "batch_val_loss": "loss/test_batch", "wall_time_s": "time/wall_s"}


def _summary_writer(logdir: str | os.PathLike):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ValueError("TensorBoard logs are written with tensorboardX, which is not installed: "
                         "pip install tensorboardX (or the experiments extra, pip install -e \".[experiments]\")") \
            from None
    Path(logdir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(logdir=str(logdir))


def hyperparameters(config: TrainConfig) -> dict:
    """A TrainConfig as TensorBoard's hyperparameters: the names `--set` takes
    ("bn.momentum", `settings_by_name`), values that are numbers, strings or
    booleans (None as "None")."""
    return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
            for name, value in settings_by_name(config).items()}


class TensorBoardLog:
    """A run's TensorBoard log, written as the run goes: `add(record)` at each
    evaluation (a record as the training loops report it), `close(history)`
    at the end (the hyperparameters with the final accuracy). Also usable as
    `bnjax.train`'s `on_eval`: `train(config, data, on_eval=log.on_eval)`.

    Args:
      logdir: the run's folder (made if missing); TensorBoard reads every
        run under the folder given to `--logdir`.
      config: the run's TrainConfig.
    """

    def __init__(self, logdir: str | os.PathLike, config: TrainConfig):
        self.config = config
        self.writer = _summary_writer(logdir)

    def add(self, record: dict) -> None:
        """One evaluation's numbers, at its step (`record["steps"]`)."""
        for field, tag in TAGS.items():
            value = record.get(field)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, record["steps"])
        self.writer.flush()

    def on_eval(self, config, step: int, total_steps: int, record: dict) -> None:
        self.add(record)

    def close(self, history=None) -> None:
        """The hyperparameters, with the final test accuracy (running
        averages, and precise or batch statistics where measured), then the
        files closed."""
        from tensorboardX.summary import hparams

        metrics = {}
        if history is not None and history.steps:
            for field in ("val_accuracy", "precise_val_accuracy", "batch_val_accuracy"):
                values = getattr(history, field)
                if values and math.isfinite(values[-1]):
                    metrics[f"final/{TAGS[field]}"] = values[-1]
        for summary in hparams(hyperparameters(self.config), metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, history.steps[-1])
        self.writer.close()


def write_tensorboard(logdir: str | os.PathLike, config: TrainConfig, history: History) -> None:
    """A finished run's History as TensorBoard event files in `logdir`: every
    evaluation's scalars and the config as hyperparameters (module doc). For
    runs trained by `train` or `train_many` and for saved results alike.

    Args:
      logdir: the run's folder (made if missing).
      config: the run's TrainConfig.
      history: its History.
    Returns:
      None; the files are written when it returns."""
    log = TensorBoardLog(logdir, config)
    columns = history.to_dict()
    for index, step in enumerate(history.steps):
        log.add({"steps": step, **{field: columns[field][index] for field in TAGS if len(columns[field]) > index}})
    log.close(history)
