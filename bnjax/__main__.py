"""Train one run from the command line, any `TrainConfig` field set by name.

    python -m bnjax                                           # the article's BN-less net, 3 epochs
    python -m bnjax --set batch_norm=true --set learning_rate=0.01 --set max_steps=200
    python -m bnjax --set batch_norm=true --set activation=sigmoid --save runs/one.json
    python -m bnjax --fields                                  # every field, its default and type
    python -m bnjax --set max_steps=3000 --checkpoint runs/one.ckpt   # Ctrl-C, run again: it resumes
    python -m bnjax --replay outputs/article/results.json --run 3        # a saved run again, as it was launched

Values are read by the field's type: true/false for booleans, integers,
numbers, names, and `none` for the optional integers. Progress goes to stdout
at each evaluation, then the final test accuracy; `--save` writes the config,
the environment and the History as one JSON file (atomically). A bad field or
value ends with one line naming it and what is allowed. Exit status: 0 when
the run trained to its end, 1 when the data could not be loaded, 2 for bad
input, 3 when the run diverged (its History is still saved), 130 on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys


class CtrlC:
    """Ctrl-C obeyed at any moment. A KeyboardInterrupt raised inside a
    garbage-collection callback (JAX runs one) or a finalizer is swallowed by
    Python, which prints its traceback and goes on; one raised while this
    module is still importing would end in a traceback. So a Ctrl-C is
    remembered, raised only once `main` runs and never inside a callback or
    finalizer, and checked again at every evaluation (`check`)."""

    pressed = False
    armed = False

    @classmethod
    def handle(cls, signum, frame):
        cls.pressed = True
        if cls.armed and not cls.inside_swallowing_code(frame):
            raise KeyboardInterrupt

    @staticmethod
    def inside_swallowing_code(frame) -> bool:
        """Whether `frame` or a caller is a gc callback or a `__del__`, where
        an exception would be printed as "Exception ignored in" and dropped."""
        import gc

        callback_codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
        while frame is not None:
            if frame.f_code in callback_codes or frame.f_code.co_name == "__del__":
                return True
            frame = frame.f_back
        return False

    @classmethod
    def check(cls):
        if cls.pressed:
            raise KeyboardInterrupt


if __name__ == "__main__":  # the program, not an import of it: before the slow imports below
    signal.signal(signal.SIGINT, CtrlC.handle)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import difflib  # noqa: E402
import json  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

import bnjax
from bnjax.bn.batchnorm import RUNNING_AVERAGES, Renorm, keras_bn
from bnjax.support.checks import OneLineArgumentParser
from bnjax.data.datasets import DATASETS, SOURCES, DataError, load_dataset
from bnjax.engine.launch import Observer, launch_like, replay
from bnjax.support import host
from bnjax.support.atomic import unwritable_reason, write_json
from bnjax.support.compilation_cache import use_persistent_cache
from bnjax.support.provenance import environment
from bnjax.support.xla_flags import use_cpu_flags
from bnjax.training.checkpoint import checkpoint_exists, saved_step
from bnjax.training.config import (BN_LAYERS, CHOICES, LEGACY_BN_FIELDS, TrainConfig, bn_from_dict, bn_settings_by_name,
                                   bn_settings_of, bn_to_dict, settings_by_name)
from bnjax.training.history import DIVERGED_LOSS
from bnjax.training.tensorboard import TensorBoardLog

# What `--set` takes, by name: TrainConfig's fields but `bn`, each of whose
# settings is set by itself, "bn.momentum=0.9" (`bn.renorm=true` is the
# default Renorm, `bn.renorm.r_max=2` one of its settings).
SETTING_TYPES = {name: kind for name, kind in typing.get_type_hints(TrainConfig).items() if name != "bn"} | {
    "bn.layer": str} | {f"bn.{name}": kind for layer in BN_LAYERS.values()
                        for name, kind in typing.get_type_hints(layer).items() if name in bn_settings_of(layer)} | {
    "bn.renorm": bool} | {
    f"bn.renorm.{name}": kind for name, kind in typing.get_type_hints(Renorm).items()}


def setting_kind(name: str) -> tuple[type, bool]:
    """(the type `--set name=...` takes, whether it may be None)."""
    kind = SETTING_TYPES[name]
    return next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind), \
        type(None) in typing.get_args(kind)


def parse_value(name: str, text: str):
    """`text` as a value of setting `name`; ValueError names what is allowed."""
    base, optional = setting_kind(name)
    if optional and text.lower() == "none":
        return None
    if base is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer{' or none' if optional else ''}, got {text!r}") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None
    return text


def config_from_settings(settings: list[str]) -> TrainConfig:
    """TrainConfig from ["field=value", "bn.setting=value", ...]; ValueError on
    an unknown name or a bad value."""
    values, bn, renorm = {}, {}, {}
    for setting in settings:
        name, equals, text = setting.partition("=")
        name = name.strip()
        if not equals:
            raise ValueError(f"--set needs FIELD=VALUE, got {setting!r}")
        if name not in SETTING_TYPES:
            raise ValueError(f"unknown TrainConfig field {name!r}; {_hint(name)}python -m bnjax --fields lists them")
        value = parse_value(name, text.strip())
        if name.startswith("bn.renorm."):
            renorm[name.removeprefix("bn.renorm.")] = value
        elif name.startswith("bn."):
            bn[name.removeprefix("bn.")] = value
        else:
            values[name] = value
    if renorm:
        if bn.get("renorm") is not True:
            raise ValueError(f"bn.renorm.{next(iter(renorm))} is a setting of Batch Renorm, which this run does not "
                             "use; add --set bn.renorm=true")
        bn["renorm"] = renorm
    if bn:
        values["bn"] = bn_from_dict(bn)
    return TrainConfig(**values)  # its own checks name any value out of range


# The flat names of BN's settings before `bn` was one field whose `--set`
# name now is not simply "bn." or "bn.renorm." and the setting's name.
FLAT_NAMES = {"bn_two_pass_variance": "bn.use_fast_variance (its opposite)", "bn_noise": "bn.layer=NoisyBatchNorm",
              "bn_renorm": "bn.renorm"}


def _hint(name: str) -> str:
    """What to say of an unknown `--set` name: what sets a flat BN name now,
    or a known name close to it."""
    if name in LEGACY_BN_FIELDS:
        prefix = "bn.renorm." if name.startswith("bn_renorm_") else "bn."
        return f"BN's settings are set as {FLAT_NAMES.get(name, prefix + LEGACY_BN_FIELDS[name])}; "
    close = difflib.get_close_matches(name, SETTING_TYPES, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


# A BN run's eval-mode accuracy this far below its training accuracy gets one
# line of explanation (once), so that a first run does not look broken.
LAG_EXPLAINED_FROM = 0.2


def running_average_lag_note(config: TrainConfig, step: int, record: dict) -> str | None:
    """Why a BN run's test accuracy (running averages) trails its training
    accuracy early on, when it does by `LAG_EXPLAINED_FROM` or more; else None."""
    if not config.batch_norm or config.eval_statistics != "running" \
            or record["train_accuracy"] - record["val_accuracy"] < LAG_EXPLAINED_FROM:
        return None
    bn = config.bn_layer()
    initial_weight = (f", and still weigh their initial values (mean 0, variance 1) by "
                      f"{bn.momentum}**{step} = {bn.momentum ** step:.2f}" if bn.running_average == "ema" else "")
    return (f"note: test accuracy {record['val_accuracy']:.4f} against {record['train_accuracy']:.4f} in training: "
            f"in eval mode BN uses its running averages, which trail the weights{initial_weight}; "
            "--set eval_statistics=precise also shows the same weights with precise BN statistics")


def setting_defaults() -> dict:
    """Each `--set` name's default: TrainConfig's, and for bn. the default
    BN settings' (those of NoisyBatchNorm alone, and of Renorm, at their own)."""
    bn = {}
    for layer in BN_LAYERS.values():  # those of NoisyBatchNorm alone, at its own defaults
        bn |= bn_settings_by_name(bn_to_dict(layer()))
    bn |= bn_settings_by_name(bn_to_dict(keras_bn())) | {f"bn.renorm.{name}": value for name, value
                                                         in dataclasses.asdict(Renorm()).items()}
    return settings_by_name(TrainConfig()) | bn


def allowed_values(name: str) -> str:
    """What `--set name=...` takes, in words."""
    choices = CHOICES | {"bn.layer": tuple(BN_LAYERS), "bn.running_average": RUNNING_AVERAGES}
    if name in choices:
        return "one of " + ", ".join(choices[name])
    base, optional = setting_kind(name)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a name"}.get(base, str(base))
    return words + (" or none" if optional else "")


def describe_fields() -> str:
    """Every `--set` name as a table: its name, default and what it takes."""
    defaults = setting_defaults()
    rows = [("field", "default", "takes")] + [(name, repr(defaults[name]), allowed_values(name))
                                              for name in SETTING_TYPES]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(f"  {name:{widths[0]}}  {default:{widths[1]}}  {takes}" for name, default, takes in rows)


def changed_settings(config: TrainConfig) -> dict:
    """The run's settings that differ from the defaults, by `--set` name."""
    defaults = setting_defaults()
    return {name: value for name, value in settings_by_name(config).items() if value != defaults[name]}


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m bnjax", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set one TrainConfig field (repeatable)")
    parser.add_argument("--save", default=None, metavar="PATH", help="write config, environment and History as JSON")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="save the whole run there at every evaluation; a run started with an existing "
                             "checkpoint of the same config resumes from it, to the numbers it would have reached")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also write the run's curves and config as TensorBoard event files there "
                             "(tensorboard --logdir DIR; needs tensorboardX)")
    parser.add_argument("--fields", action="store_true", help="list the TrainConfig fields and their defaults")
    parser.add_argument("--replay", default=None, metavar="FILE",
                        help="train a saved run (a --save file, or a results.json with --run) again as it was "
                             "launched and compare its History with the saved one")
    parser.add_argument("--run", type=int, default=None, metavar="N", help="with --replay: which run of a results file")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="data source (docs/data.md)")
    parser.add_argument("--data-dir", default=None, help="IDX directory or TFDS data_dir")
    return parser


def _progress_printer(config: TrainConfig):
    """on_eval for `train`: one line per evaluation, and the running-average
    lag note once, at the first evaluation that shows it."""
    other = f"{config.eval_statistics}_val_accuracy"  # with eval_statistics "precise" or "batch"
    notes = []

    def show(config, step, total_steps, record):
        CtrlC.check()  # a Ctrl-C that a garbage-collection callback swallowed
        also = f" {other} {record[other]:.4f}" if other in record else ""
        print(f"step {step}/{total_steps} val_accuracy {record['val_accuracy']:.4f}{also} "
              f"train_loss {record['train_loss']:.4f}", flush=True)
        note = None if notes else running_average_lag_note(config, step, record)
        if note:
            notes.append(note)
            print(note, flush=True)

    return show


class OneRun(Observer):
    """The command line's say in its one run: progress lines, its --checkpoint
    path and its --tensorboard log (a `TensorBoardLog`, or None)."""

    def __init__(self, show_progress, checkpoint: str | None, log=None):
        super().__init__()
        self.show_progress, self.checkpoint, self.log = show_progress, checkpoint, log

    def checkpoint_path(self, config: TrainConfig) -> str | None:
        return self.checkpoint

    def on_eval(self, config: TrainConfig, step: int, total_steps: int, record: dict) -> None:
        self.show_progress(config, step, total_steps, record)
        if self.log is not None:
            self.log.add(record)


def tensorboard_log(parser, args, config: TrainConfig):
    """The run's `TensorBoardLog` under --tensorboard (None without it); one
    line and exit 2, before any training, if it cannot be written."""
    if args.tensorboard is None:
        return None
    try:
        return TensorBoardLog(args.tensorboard, config)
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: --tensorboard {args.tensorboard}: {error}\n")


CURVES = ("steps", "val_accuracy", "val_loss", "precise_val_accuracy", "precise_val_loss", "batch_val_accuracy",
          "batch_val_loss", "train_accuracy", "train_loss")


def _saved_run(parser, args) -> tuple[dict, dict]:
    """(the file's contents, the run) that --replay and --run name; exits in one line if there is none."""
    try:
        saved = json.loads(Path(args.replay).read_text())
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: --replay {args.replay}: {error}\n")
    runs = saved.get("runs")
    if runs is None:
        return saved, saved
    if args.run is None or not 0 <= args.run < len(runs):
        parser.exit(2, f"error: --replay {args.replay} holds {len(runs)} runs: give --run 0 to {len(runs) - 1}"
                       f"{'' if args.run is None else f', not {args.run}'}\n")
    return saved, runs[args.run]


def saved_twin_note(config: TrainConfig, folders=("outputs", "runs")) -> str | None:
    """One line when a results file under `folders` holds a run of exactly
    this config: trained by a sweep, launched otherwise than this process
    launches it, so its numbers differ by float round-off; how to get them."""
    for path in sorted(p for folder in folders for p in [*Path(folder).glob("*/results.json"),
                                                          *Path(folder).glob("*/*/results.json")]):
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError):
            continue
        for index, run in enumerate(runs):
            try:
                same = TrainConfig.from_dict(run["config"]) == config
            except (TypeError, ValueError, KeyError):
                continue
            if not same:
                continue
            launch = run.get("launch") or {}
            if launch.get("loop") == "engine":
                return (f"note: {path} run {index} is this config, trained by a sweep ({launch['cpu_cores']} CPU "
                        f"core(s), {len(launch['program'])} run(s) in its program): this run's float round-off can "
                        f"differ; python -m bnjax --replay {path} --run {index} gives its numbers")
            return (f"note: {path} run {index} is this config, trained by a sweep whose launch was not recorded: "
                    "this run's numbers can differ from it by float round-off (docs/reliability.md)")
    return None


def replay_main(parser, args) -> None:
    """--replay: the saved run trained again as it was launched, compared curve by curve."""
    saved, run = _saved_run(parser, args)
    launch = run.get("launch") or {}
    cores_as_recorded = launch_like(launch)  # the CPU cores and XLA flags the run had, before JAX starts
    name = f"{args.replay}" + ("" if args.run is None else f" run {args.run}")
    if not cores_as_recorded:
        print(f"note: the run had {launch['cpu_cores']} CPU core(s); this process cannot be limited to that many "
              f"here (it may use {host.usable_core_count() or 'an unknown number of'}), so its float round-off "
              "can differ", flush=True)
    print(f"replaying {name}: {launch.get('loop', 'no launch record')} loop, {launch.get('cpu_cores', '?')} CPU "
          f"core(s), {len(launch.get('program', [[0]]))} run(s) in its program", flush=True)
    try:
        data = load_dataset(saved.get("dataset", args.dataset), args.source, args.data_dir)
        use_persistent_cache()
        history = replay(run, data)
    except (DataError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    differing = [curve for curve in CURVES if getattr(history, curve) != run.get(curve, [])]
    if differing:
        parser.exit(1, f"replayed {name}: differs from the saved run in {', '.join(differing)}\n")
    print(f"replayed {name}: every curve equal to the saved run's, bit for bit ({len(history.steps)} evaluations)")


def main(argv=None) -> None:
    use_cpu_flags()  # where the program starts, before any JAX computation
    parser = _parser()
    args = parser.parse_args(argv)
    CtrlC.armed = True
    try:
        CtrlC.check()  # pressed while the program was still importing
        run(parser, args)
    except KeyboardInterrupt:
        parser.exit(130, f"interrupted; {'resume with the same command' if args.checkpoint else 'nothing saved'}\n")
    finally:
        CtrlC.armed = False


def check_output_paths(parser, args) -> None:
    """Refuse, before any training (whose result would be lost at the end),
    a --save or --checkpoint path that cannot be written. A checkpoint is a
    folder whose files are written inside it (an earlier bnjax's checkpoint
    file is read, then replaced by the folder)."""
    inside_checkpoint = args.checkpoint and not os.path.isfile(args.checkpoint) and os.path.join(args.checkpoint, "0")
    for flag, path, written in (("--save", args.save, args.save), ("--checkpoint", args.checkpoint, inside_checkpoint)):
        reason = unwritable_reason(written) if written else None
        if reason:
            parser.exit(2, f"error: {flag} {path} {reason}\n")


def run(parser, args) -> None:
    """The program, once its arguments are parsed (`main` turns Ctrl-C into one line)."""
    if args.fields:
        print(describe_fields())
        return
    if args.replay:
        replay_main(parser, args)
        return
    try:
        config = config_from_settings(args.set)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    check_output_paths(parser, args)
    log = tensorboard_log(parser, args, config)
    changed = changed_settings(config)
    print(f"training one run: {changed or 'the defaults (the article plain net)'}", flush=True)
    note = saved_twin_note(config)
    if note:
        print(note, flush=True)
    try:
        data = load_dataset(args.dataset, args.source, args.data_dir)
    except (DataError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")

    use_persistent_cache()
    CtrlC.check()
    if args.checkpoint and checkpoint_exists(args.checkpoint):
        try:
            print(f"resuming {args.checkpoint} from step {saved_step(args.checkpoint)}", flush=True)
        except ValueError as error:  # damaged, or not a checkpoint: before any training
            parser.exit(2, f"error: {error}\n")
    print(f"compiling, then training; a line every {config.eval_every} steps", flush=True)
    try:
        # Through the engine, as the studies train (one run, this process);
        # with --checkpoint, the run is saved and resumed at that path.
        [(history, _)] = bnjax.train_many([config], data, observer=OneRun(_progress_printer(config), args.checkpoint,
                                                                               log))
    except ValueError as error:  # e.g. a batch that does not divide over the devices
        parser.exit(2, f"error: {error}\n")
    outcome = f"diverged (training loss {history.train_loss[-1]:.4g})" if history.diverged else "done"
    print(f"{outcome}: final test accuracy {history.val_accuracy[-1]:.4f} after {history.steps[-1]} steps, "
          f"{history.total_wall_time_s:.1f} s", flush=True)
    other = getattr(history, f"{config.eval_statistics}_val_accuracy", None)
    if other:
        print(f"the same weights with {config.eval_statistics} BN statistics: test accuracy "
              f"{other[-1]:.4f} ({history.eval_statistics_time_s:.1f} s of evaluation)", flush=True)
    if args.save:
        write_json(args.save, {"config": config.to_dict(), "environment": environment(),
                               **history.to_dict()})
        print(f"saved {args.save}")
    if log is not None:
        log.close(history)
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard}")
    if history.diverged:
        parser.exit(3, f"the run diverged: its training loss is NaN, infinite or above {DIVERGED_LOSS:.0f} "
                       "(bnjax.training.history.has_diverged)\n")


def exit_now_if_interrupted(exit_status) -> None:
    """After Ctrl-C's one line, end the process at once: a Ctrl-C that lands
    while a library is starting a thread can leave that thread running, and
    Python would wait for it (JAX starts a 60 s timer while it looks for a
    TPU; interrupted inside `Thread.start`, the timer is never cancelled, and
    the program would end a minute later with JAX's warning under our line)."""
    if exit_status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as program_exit:
        exit_now_if_interrupted(program_exit.code)
        raise
