"""What one training run is: `TrainConfig`, checked field by field when made.

Every field is data (a number, a string, a bool; BN's settings one unbound
`BatchNorm`, a dataclass of such values), so a config can be saved beside
its results (`to_dict` / `from_dict`), compared with a checkpoint's and set
from the command line (`python -m bnjax --set learning_rate=0.01
--set bn.momentum=0.9`). A bad value raises a ValueError naming the field,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math

from bnjax.bn.batchnorm import BatchNorm, Renorm, keras_bn
from bnjax.bn.lp_norm import LpBatchNorm
from bnjax.bn.noisy import NoisyBatchNorm
from bnjax.nets.models import ACTIVATIONS, BN_POSITIONS, KERNEL_INITS, bn_of
from bnjax.nets.recurrent import SEQUENCES, check_lstm_settings
from bnjax.support.checks import check_bool, check_choice, check_integer, check_positive_real, is_real

OPTIMIZERS = ("adam", "sgd", "rmsprop")
# The article's CNN; the BN paper's 3 x 100 MLP; an LSTM or BN-LSTM reading
# the image as a sequence (`paper_settings` gives the BN-LSTM paper's).
MODELS = ("convnet", "mlp", "lstm")
EVAL_STATISTICS = ("running", "precise", "batch")  # training/evaluation.py
COMPUTE_DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")  # JAX's, for float32 products (support/provenance.py says what each is)
# The fields that take one of a few names, and those names (python -m bnjax --fields shows them).
CHOICES = {"activation": sorted(ACTIVATIONS), "model": MODELS, "optimizer": OPTIMIZERS,
           "kernel_init": sorted(KERNEL_INITS), "eval_statistics": EVAL_STATISTICS,
           "bn_position": BN_POSITIONS, "compute_dtype": COMPUTE_DTYPES, "matmul_precision": MATMUL_PRECISIONS,
           "sequence": tuple(SEQUENCES)}
MAX_SEED = 2**32 - 1  # jax.random.key(seed) keeps the low 32 bits
# The BN layers a run's `bn` may be, by name (as `to_dict` writes them).
BN_LAYERS = {"BatchNorm": BatchNorm, "NoisyBatchNorm": NoisyBatchNorm, "LpBatchNorm": LpBatchNorm}
# BatchNorm's fields that a net sets for each of its BN layers (its feature
# axis, train or eval mode, dtypes, initializers, whether it learns a scale
# and a bias, the device axis) rather than the run.
SET_BY_THE_NET = ("use_running_average", "axis", "dtype", "param_dtype", "use_bias", "use_scale", "bias_init",
                  "scale_init", "axis_name", "axis_index_groups", "force_float32_reductions")
BN_FIELD_DEFAULTS = {field.name: field.default for field in dataclasses.fields(BatchNorm)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults reproduce the article: Keras 2.0.8's Adam,
    batch 32, 3 epochs of one pass (1875 steps) each, batches in a fixed order."""

    batch_norm: bool = False
    # BN's settings when batch_norm is on, as one value: an unbound
    # `BatchNorm` (or `NoisyBatchNorm`), checked by its own checks when it is
    # made, that every BN layer of the net copies. None: the article's, Keras's
    # momentum 0.99 and epsilon 1e-3 (`keras_bn`). The net sets each layer's
    # own fields (SET_BY_THE_NET), so `bn` leaves those at BatchNorm's defaults.
    # E.g. `bn=keras_bn(momentum=0.9, renorm=Renorm(r_max=2.0))`, the default
    # settings with two changed (a bare `BatchNorm()` has flax's epsilon, 1e-5).
    bn: BatchNorm | None = None
    activation: str = "relu"
    model: str = "convnet"
    learning_rate: float = 0.001
    optimizer: str = "adam"
    # Keras 2.0.8 Adam defaults. Keras adds epsilon to sqrt(v) *before* bias
    # correction, optax after it; at 1e-8 the difference is negligible.
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    rmsprop_decay: float = 0.9  # optimizer "rmsprop": the squared gradients' average keeps this much
    grad_clip_norm: float | None = None  # None, or the gradient's global norm is clipped to this first
    batch_size: int = 32
    epochs: int = 3
    steps_per_epoch: int | None = None  # None: one pass, len(x_train) // batch_size
    seed: int = 0
    shuffle: bool = False  # False: the same fixed order every epoch, as the article
    kernel_init: str = "glorot_uniform"  # Keras's default; "lecun_normal" is Flax's
    eval_every: int = 100  # steps between evaluations on the whole test set
    eval_batch_size: int = 1000
    # Each evaluation uses BN's running averages (val_accuracy); "precise" or
    # "batch" also evaluates the same weights with precise BN statistics
    # (re-estimated from precise_bn_batches training batches of batch_size)
    # or with each test batch's own statistics, recorded beside it in the
    # History (precise_val_accuracy, batch_val_accuracy: training/evaluation.py).
    eval_statistics: str = "running"
    precise_bn_batches: int = 200
    max_steps: int | None = None  # cap on total steps (smoke runs)
    # Data parallelism: the batch is split over this many devices (None: all).
    num_devices: int | None = None
    # False: BN statistics of the global batch (synchronized across devices).
    # True: "ghost BN", each device normalizes with the statistics of its own
    # slice of the batch: a different algorithm, not an approximation.
    ghost_bn: bool = False
    # Ablations (convnet only): BN "before" or "after" the activation, and
    # whether Conv/Dense keep their bias under BN (the article drops it).
    bn_position: str = "before"
    bn_use_bias: bool = False
    # Arithmetic. compute_dtype "bfloat16": convolutions and matrix products
    # (and the activations between them) in bfloat16, while parameters,
    # optimizer state, BN's statistics (computed in float32 from the bfloat16
    # activations) and the loss stay float32, as flax's dtype / param_dtype.
    # matmul_precision: JAX's precision for float32 products, "default" being
    # one bfloat16 pass on TPUs and TF32 on recent NVIDIA GPUs ("highest": float32).
    compute_dtype: str = "float32"
    matmul_precision: str = "default"
    # Model "lstm" (nets/recurrent.py): how the image is read (SEQUENCES), the
    # hidden units, the rows of per-step BN statistics (None: one per step),
    # the initial BN scale (the paper's 0.1) and the pixel order's seed.
    sequence: str = "rows"
    lstm_hidden_size: int = 100
    lstm_t_max: int | None = None
    lstm_bn_scale_init: float = 0.1
    permutation_seed: int = 0

    def __post_init__(self):
        for name in ("batch_norm", "shuffle", "ghost_bn", "bn_use_bias"):
            check_bool(name, getattr(self, name))
        for name, allowed in CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        self._check_bn()
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        check_lstm_settings(self, defaults)
        if self.model != "convnet" and (self.bn_position != "before" or self.bn_use_bias):
            raise ValueError(f"bn_position and bn_use_bias apply to model 'convnet' only, not {self.model!r}")
        for name in ("batch_size", "epochs", "eval_every", "eval_batch_size", "precise_bn_batches", "lstm_hidden_size"):
            check_integer(name, getattr(self, name))
        for name in ("steps_per_epoch", "max_steps", "num_devices"):
            check_integer(name, getattr(self, name), optional=True)
        for name in ("seed", "permutation_seed"):
            check_integer(name, getattr(self, name), minimum=0)
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (JAX's PRNG key takes 32 bits: a larger "
                             f"seed would give a smaller seed's run), got {self.seed!r}")
        for name in ("learning_rate", "adam_eps", "lstm_bn_scale_init"):
            check_positive_real(name, getattr(self, name))
        if self.grad_clip_norm is not None:
            check_positive_real("grad_clip_norm", self.grad_clip_norm)
        for name in ("adam_b1", "adam_b2", "rmsprop_decay"):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    def _check_bn(self) -> None:
        """`bn` is a BatchNorm that leaves the net's fields to the net, and a
        BN setting (bn, ghost_bn, BN's position or bias, BN statistics in
        evaluation) is refused on a run without BN rather than ignored."""
        if self.bn is not None:
            if not isinstance(self.bn, BatchNorm):
                raise ValueError(f"bn must be None or a bnjax.BatchNorm(...) of BN's settings, got {self.bn!r}")
            for name in SET_BY_THE_NET:
                if getattr(self.bn, name) != BN_FIELD_DEFAULTS[name]:
                    raise ValueError(f"bn.{name} is set by the net for each of its BN layers; leave it at "
                                     f"{BN_FIELD_DEFAULTS[name]!r}, got {getattr(self.bn, name)!r}")
            if self.bn == keras_bn():  # one config, one spelling: None is the default settings
                object.__setattr__(self, "bn", None)
        if not self.batch_norm:
            bn_settings = {"bn": self.bn, "ghost_bn": self.ghost_bn, "bn_position": self.bn_position,
                           "bn_use_bias": self.bn_use_bias}
            for name, value in bn_settings.items():
                if value != TrainConfig.__dataclass_fields__[name].default:
                    shown = describe_bn(value) if name == "bn" else repr(value)
                    raise ValueError(f"{name}={shown} is a BN setting, and this run has no BN (batch_norm=False); "
                                     "set batch_norm=True or leave it at its default")
            if self.eval_statistics != "running":
                raise ValueError(f"eval_statistics {self.eval_statistics!r} needs BN statistics, and this model has "
                                 "no BN (batch_norm=False); use 'running' or batch_norm=True")
        ghost_batch_size = None if self.bn is None else self.bn.ghost_batch_size
        if ghost_batch_size is not None:
            if self.batch_size % ghost_batch_size:
                raise ValueError(f"bn.ghost_batch_size {ghost_batch_size} must divide batch_size {self.batch_size}")
            if self.eval_statistics == "batch" and self.eval_batch_size % ghost_batch_size:
                raise ValueError(f"bn.ghost_batch_size {ghost_batch_size} must divide eval_batch_size "
                                 f"{self.eval_batch_size} (eval_statistics 'batch' evaluates test batches in train "
                                 "mode)")

    def bn_layer(self, axis_name: str | None = None) -> BatchNorm:
        """The BatchNorm every BN layer of the run's net copies: `bn`, or the
        default settings, averaging its statistics over the mesh axis
        `axis_name` (`make_model` names it)."""
        return bn_of(self).clone(axis_name=axis_name)

    def to_dict(self) -> dict:
        """The config as JSON-ready data: `bn` as the settings the run's BN
        layers use (`bn_to_dict`, the default settings written out), None on
        a run without BN."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**fields, "bn": bn_to_dict(self.bn_layer()) if self.batch_norm else None}

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        """The config `to_dict` wrote, or the flat form of results and
        checkpoints saved before `bn` was one field (its `bn_*` fields, which
        a run without BN ignored); missing fields take their defaults.
        ValueError names an unknown field or a bad value."""
        fields = dict(fields)
        if any(name in LEGACY_BN_FIELDS for name in fields):
            fields = _from_flat_form(fields)
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown TrainConfig field {unknown[0]!r}; python -m bnjax --fields lists them")
        if isinstance(fields.get("bn"), dict):
            fields["bn"] = bn_from_dict(fields["bn"])
        return cls(**fields)


def bn_to_dict(bn: BatchNorm) -> dict:
    """BN's settings as data: the layer's class ("layer") and each of its
    fields the net does not set, a Renorm as a dict of its own."""
    settings = {name: getattr(bn, name) for name in bn_settings_of(type(bn))}
    if settings.get("renorm") is not None:
        settings["renorm"] = dataclasses.asdict(settings["renorm"])
    if settings.get("p") == math.inf:  # LpBatchNorm's l_inf: JSON has no word for infinity
        settings["p"] = "inf"
    return {"layer": type(bn).__name__, **settings}


def bn_from_dict(settings: dict) -> BatchNorm:
    """The BatchNorm `bn_to_dict` wrote; settings it lacks are Keras's, the
    run's default (`keras_bn`). ValueError, prefixed "bn", names a bad one."""
    settings = dict(settings)
    if settings.get("p") == "inf":
        settings["p"] = math.inf
    layer = settings.pop("layer", "BatchNorm")
    check_choice("bn.layer", layer, BN_LAYERS)
    known = bn_settings_of(BN_LAYERS[layer])
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"bn ({layer}) has no setting {unknown[0]!r}; its settings: {', '.join(known)}")
    if isinstance(settings.get("renorm"), dict):
        settings["renorm"] = _made("bn.renorm", Renorm, settings["renorm"])
    elif settings.get("renorm") is True:  # Keras's idiom: the default Renorm
        settings["renorm"] = Renorm()
    elif settings.get("renorm") is False:
        settings["renorm"] = None
    return _made("bn", keras_bn, {"layer": BN_LAYERS[layer], **settings})


def settings_by_name(config: TrainConfig) -> dict:
    """The config flat, by the names `python -m bnjax --set` takes: its fields
    but `bn`, and on a BN run each of its BN settings (`bn_settings_by_name`)."""
    fields = config.to_dict()
    bn = fields.pop("bn")
    return fields if bn is None else fields | bn_settings_by_name(bn)


def bn_settings_by_name(bn: dict) -> dict:
    """`bn_to_dict`'s settings by `--set` name: "bn.layer", "bn.momentum", ...,
    "bn.renorm" (whether Batch Renorm is on) and its own, "bn.renorm.r_max", ..."""
    renorm = bn.get("renorm")
    flat = {f"bn.{name}": value for name, value in bn.items() if name != "renorm"} | {"bn.renorm": renorm is not None}
    return flat | {f"bn.renorm.{name}": value for name, value in (renorm or {}).items()}


def describe_bn(bn: BatchNorm) -> str:
    """BN's settings in one line, those that differ from the layer's defaults:
    "BatchNorm(momentum=0.9, renorm=Renorm(r_max=2.0, ...))"."""
    defaults = {name: BN_FIELD_DEFAULTS.get(name, getattr(type(bn), name, None)) for name in bn_settings_of(type(bn))}
    shown = [f"{name}={getattr(bn, name)!r}" for name in bn_settings_of(type(bn)) if getattr(bn, name) != defaults[name]]
    return f"{type(bn).__name__}({', '.join(shown)})"


def bn_settings_of(layer: type) -> list[str]:
    """The fields of BN layer class `layer` a run sets: all but SET_BY_THE_NET."""
    return [field.name for field in dataclasses.fields(layer)
            if field.name not in SET_BY_THE_NET and field.name not in ("parent", "name")]


def _made(name: str, kind: type, settings: dict):
    try:
        return kind(**settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None


# The flat form of results and checkpoints written before `bn` was one field:
# each old field and the BatchNorm setting it held.
LEGACY_BN_FIELDS = {"bn_momentum": "momentum", "bn_epsilon": "epsilon", "bn_running_average": "running_average",
                    "bn_two_pass_variance": "use_fast_variance", "bn_frozen": "frozen",
                    "bn_ghost_batch_size": "ghost_batch_size", "bn_renorm": "renorm", "bn_renorm_r_max": "r_max",
                    "bn_renorm_d_max": "d_max", "bn_renorm_momentum": "momentum", "bn_renorm_warmup_steps":
                        "warmup_steps", "bn_noise": "layer"}


def _from_flat_form(fields: dict) -> dict:
    flat = {name: fields.pop(name) for name in list(fields) if name in LEGACY_BN_FIELDS}
    if not fields.get("batch_norm", False):  # these runs trained without BN, whatever the BN fields said
        for name in ("ghost_bn", "bn_position", "bn_use_bias"):
            fields.pop(name, None)
        return fields
    settings = {LEGACY_BN_FIELDS[name]: value for name, value in flat.items()
                if name in ("bn_momentum", "bn_epsilon", "bn_running_average", "bn_frozen", "bn_ghost_batch_size")}
    if "bn_two_pass_variance" in flat:
        settings["use_fast_variance"] = not flat["bn_two_pass_variance"]
    if flat.get("bn_renorm"):
        settings["renorm"] = {LEGACY_BN_FIELDS[name]: flat[name] for name in flat if name.startswith("bn_renorm_")}
    if flat.get("bn_noise"):
        settings["layer"] = "NoisyBatchNorm"
    return {**fields, "bn": settings}
