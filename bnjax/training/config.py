"""What one training run is: `TrainConfig`, checked field by field when made.

Every field is data (a number, a string, a bool), so a config can be saved
beside its results, compared with a checkpoint's and set from the command
line (`python -m bnjax --set learning_rate=0.01`). A bad value raises a
ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses

from bnjax.bn.batchnorm import RUNNING_AVERAGES, BatchNorm, Renorm, check_renorm_settings, check_variant
from bnjax.bn.noisy import NoisyBatchNorm
from bnjax.nets.models import ACTIVATIONS, BN_POSITIONS, KERNEL_INITS
from bnjax.nets.recurrent import SEQUENCES, sequence_length
from bnjax.support.checks import check_bool, check_choice, check_integer, check_positive_real, is_integer, is_real

OPTIMIZERS = ("adam", "sgd", "rmsprop")
# The article's CNN; the BN paper's 3 x 100 MLP; an LSTM or BN-LSTM reading
# the image as a sequence (nets/recurrent.py; PAPER_SETTINGS there).
MODELS = ("convnet", "mlp", "lstm")
# Fields model "lstm" takes at their defaults only (nets/recurrent.py: its own
# initializers, per-step statistics without Renorm or frozen BN, one device's
# statistics, float32 arithmetic), and the fields of model "lstm" alone.
NOT_FOR_LSTM = ("kernel_init", "bn_renorm", "bn_frozen", "ghost_bn", "bn_ghost_batch_size", "bn_noise",
                "compute_dtype")
LSTM_ONLY = ("sequence", "lstm_hidden_size", "lstm_t_max", "lstm_bn_scale_init", "permutation_seed")
EVAL_STATISTICS = ("running", "precise", "batch")  # training/evaluation.py
COMPUTE_DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")  # JAX's, for float32 products (support/provenance.py says what each is)
# The fields that take one of a few names, and those names (python -m bnjax --fields shows them).
CHOICES = {"activation": sorted(ACTIVATIONS), "model": MODELS, "optimizer": OPTIMIZERS,
           "kernel_init": sorted(KERNEL_INITS), "bn_running_average": RUNNING_AVERAGES, "eval_statistics": EVAL_STATISTICS,
           "bn_position": BN_POSITIONS, "compute_dtype": COMPUTE_DTYPES, "matmul_precision": MATMUL_PRECISIONS,
           "sequence": tuple(SEQUENCES)}
MAX_SEED = 2**32 - 1  # jax.random.key(seed) keeps the low 32 bits


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults reproduce the article: Keras 2.0.8's Adam,
    batch 32, 3 epochs of one pass (1875 steps) each, batches in a fixed order."""

    batch_norm: bool = False
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
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    # How BN's running statistics average the batch statistics: "ema" (Keras,
    # Flax, PyTorch), "debiased_ema" (Haiku), "cumulative" (PyTorch momentum=None);
    # `running_average_weights` has the equations.
    bn_running_average: str = "ema"
    # BN's batch variance in two passes, E[(x - E[x])^2], instead of one,
    # E[x^2] - E[x]^2 (`batch_statistics` says when it matters).
    bn_two_pass_variance: bool = False
    # Batch Renormalization (Ioffe 2017; `batch_renorm_train`):
    # r clipped to [1/r_max, r_max], d to [-d_max, d_max], both opened up
    # linearly over the first warm-up steps; its averages use their own momentum.
    bn_renorm: bool = False
    bn_renorm_r_max: float = 3.0
    bn_renorm_d_max: float = 5.0
    bn_renorm_momentum: float = 0.99
    bn_renorm_warmup_steps: int = 0
    # Frozen BN (fine-tuning): BN normalizes with its running statistics in
    # training too, never updates them, and its scale and bias get no gradient.
    bn_frozen: bool = False
    # Ghost batches inside a device: in training every BN normalizes each group
    # of this many consecutive examples of a device's batch by the group's own
    # statistics (the normalization batch size; None: the whole batch).
    # `ghost_batch_statistics.`
    bn_ghost_batch_size: int | None = None
    # Noisy BN (Santurkar et al. 2018; `NoisyBatchNorm`): in training every
    # BN output is shifted and rescaled per feature by noise drawn afresh at
    # each step, so that layer inputs' distributions move.
    bn_noise: bool = False
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
        for name, allowed in CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        if self.bn_noise is True and not self.batch_norm:
            raise ValueError("bn_noise adds noise after BN, and this model has no BN (batch_norm=False); "
                             "set batch_norm=True")
        if self.eval_statistics != "running" and not self.batch_norm:
            raise ValueError(f"eval_statistics {self.eval_statistics!r} needs BN statistics, and this model has no "
                             "BN (batch_norm=False); use 'running' or batch_norm=True")
        check_renorm_settings(self.bn_renorm_r_max, self.bn_renorm_d_max, self.bn_renorm_momentum,
                              self.bn_renorm_warmup_steps, prefix="bn_renorm_")
        check_variant(self.bn_running_average, self.bn_renorm, self.bn_frozen, self.bn_ghost_batch_size, prefix="bn_")
        if self.bn_ghost_batch_size is not None:
            self._check_ghost_batch_size()
        if self.model != "convnet" and (self.bn_position != "before" or self.bn_use_bias):
            raise ValueError(f"bn_position and bn_use_bias apply to model 'convnet' only, not {self.model!r}")
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        if self.model == "lstm":
            for name in NOT_FOR_LSTM:
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"model 'lstm' takes {name}={defaults[name]!r} only, got {getattr(self, name)!r}")
            steps = sequence_length(self.sequence)
            if self.lstm_t_max is not None and (not is_integer(self.lstm_t_max) or not 1 <= self.lstm_t_max <= steps):
                raise ValueError(f"lstm_t_max must be None or an integer from 1 to the {self.sequence!r} sequence's "
                                 f"{steps} steps, got {self.lstm_t_max!r}")
        elif any(getattr(self, name) != defaults[name] for name in LSTM_ONLY):
            raise ValueError(f"sequence and the lstm_ fields apply to model 'lstm' only, not {self.model!r}")
        for name in ("batch_norm", "shuffle", "ghost_bn", "bn_use_bias", "bn_two_pass_variance", "bn_renorm",
                     "bn_frozen", "bn_noise"):
            check_bool(name, getattr(self, name))
        for name in ("batch_size", "epochs", "eval_every", "eval_batch_size", "precise_bn_batches", "lstm_hidden_size"):
            check_integer(name, getattr(self, name))
        for name in ("steps_per_epoch", "max_steps", "num_devices"):
            check_integer(name, getattr(self, name), optional=True)
        for name in ("seed", "permutation_seed"):
            check_integer(name, getattr(self, name), minimum=0)
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (JAX's PRNG key takes 32 bits: a larger "
                             f"seed would give a smaller seed's run), got {self.seed!r}")
        for name in ("learning_rate", "adam_eps", "bn_epsilon", "lstm_bn_scale_init"):
            check_positive_real(name, getattr(self, name))
        if self.grad_clip_norm is not None:
            check_positive_real("grad_clip_norm", self.grad_clip_norm)
        for name in ("adam_b1", "adam_b2", "bn_momentum", "rmsprop_decay"):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    def _check_ghost_batch_size(self) -> None:
        size = self.bn_ghost_batch_size
        if self.batch_size % size:
            raise ValueError(f"bn_ghost_batch_size {size} must divide batch_size {self.batch_size}")
        if self.eval_statistics == "batch" and self.eval_batch_size % size:
            raise ValueError(f"bn_ghost_batch_size {size} must divide eval_batch_size {self.eval_batch_size} "
                             "(eval_statistics 'batch' evaluates test batches in train mode)")

    def batch_norm_layer(self, axis_name: str | None = None) -> BatchNorm:
        """The bn_ fields as the one BatchNorm value every net takes (`bn=`).
        `axis_name`: the mesh axis BN averages its statistics over (`make_model` names it)."""
        renorm = (Renorm(self.bn_renorm_r_max, self.bn_renorm_d_max, self.bn_renorm_momentum,
                         self.bn_renorm_warmup_steps) if self.bn_renorm else None)
        settings = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=axis_name,
                        running_average=self.bn_running_average, use_fast_variance=not self.bn_two_pass_variance,
                        renorm=renorm, frozen=self.bn_frozen, ghost_batch_size=self.bn_ghost_batch_size)
        return NoisyBatchNorm(**settings) if self.bn_noise else BatchNorm(**settings)

