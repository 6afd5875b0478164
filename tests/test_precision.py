"""Precision as configuration: TrainConfig(compute_dtype=, matmul_precision=),
and the effective precision every History records."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.support.provenance import effective_precision
from bnjax.training.config import TrainConfig
from bnjax.training.steps import matmul_precision
from bnjax.training.steps import create_train_state, to_float_images, train_step, train_step_body
from bnjax.training.train import train

BF16 = TrainConfig(batch_norm=True, compute_dtype="bfloat16")


def float_dtypes(tree) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def a_batch(data, size=32):
    return to_float_images(jnp.asarray(data.x_train[:size])), jnp.asarray(data.y_train[:size])


def lowered_train_step(config, data) -> str:
    state = create_train_state(config, jax.random.key(0))
    return jax.jit(train_step_body).lower(state, *a_batch(data)).as_text()


@pytest.mark.parametrize("model", ["convnet", "mlp"])
def test_bfloat16_keeps_parameters_optimizer_state_and_bn_statistics_in_float32(tiny_data, model):
    state = create_train_state(dataclasses.replace(BF16, model=model), jax.random.key(0))
    state, metrics = train_step(state, *a_batch(tiny_data))
    assert float_dtypes(state.params) == float_dtypes(state.batch_stats) == float_dtypes(state.opt_state) == {"float32"}
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            a_batch(tiny_data)[0], train=False)
    assert logits.dtype == jnp.float32 and metrics["loss"].dtype == jnp.float32  # the loss in float32


def test_bfloat16_convolutions_and_matrix_products_are_compiled_in_bfloat16(tiny_data):
    def products(text):  # (operations, of them with bfloat16 operands)
        lines = [line for line in text.splitlines() if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
        operand_types = [line.rsplit(":", 1)[-1].rsplit("->", 1)[0] for line in lines]  # "(tensor<..>, tensor<..>)"
        return len(lines), sum(types.count("xbf16>") == 2 for types in operand_types)

    # 5 layers forward, 5 weight gradients, 4 input gradients (none for the images)
    assert products(lowered_train_step(BF16, tiny_data)) == (14, 14)
    assert products(lowered_train_step(TrainConfig(batch_norm=True), tiny_data)) == (14, 0)


def test_matmul_precision_is_in_the_compiled_products(tiny_data):
    config = TrainConfig(batch_norm=True, matmul_precision="highest")
    with matmul_precision(config):
        text = lowered_train_step(config, tiny_data)
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots)
    default = lowered_train_step(TrainConfig(batch_norm=True), tiny_data)
    assert "HIGHEST" not in default


def test_the_loop_trains_and_evaluates_under_the_configs_matmul_precision(tiny_data):
    seen = []
    config = TrainConfig(batch_norm=True, matmul_precision="high", max_steps=4, eval_every=2)
    history, _ = train(config, tiny_data,
                       on_eval=lambda *_: seen.append(jax.config.jax_default_matmul_precision))
    assert seen == ["high", "high"]
    assert history.precision == "float32 arrays; products: float32"  # this CPU computes float32 at any precision


def test_every_history_records_its_effective_precision(tiny_data):
    history, _ = train(dataclasses.replace(BF16, max_steps=2, eval_every=2), tiny_data)
    assert history.precision.startswith("bfloat16 arrays (float32 parameters, optimizer state and BN statistics)")
    assert effective_precision("tpu", "float32", "default") == "float32 arrays; products: TPU default: one bfloat16 pass"
    assert effective_precision("gpu", "float32", "default").startswith("float32 arrays; products: GPU default: TF32")
    assert effective_precision("gpu", "float32", "highest") == "float32 arrays; products: float32"


@pytest.mark.parametrize("fields, message", [
    (dict(compute_dtype="float16"), "unknown compute_dtype 'float16'; allowed: bfloat16, float32"),
    (dict(matmul_precision="fastest"), "unknown matmul_precision 'fastest'; allowed: default, high, highest"),
    (dict(model="lstm", compute_dtype="bfloat16"), "model 'lstm' takes compute_dtype='float32' only, got 'bfloat16'"),
])
def test_bad_precision_settings_are_refused_in_one_line(fields, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**fields)
    assert str(error.value) == message


# Measured on this project's 2-core AMD EPYC CPU (jax 0.10.2): after 300 steps
# of the article's BN net (relu, lr 0.001), test accuracy with precise BN
# statistics 0.9737 (float32) vs 0.9762 (bfloat16), mean training loss of the
# last 150 steps 0.4640 vs 0.4648. (With the running averages both read 0.11-0.17
# so early: they lag the weights, docs/results.md.) The margins allow 8x and 25x that.
ACCURACY_MARGIN = 0.02
LOSS_MARGIN = 0.02


@pytest.mark.slow
def test_a_bfloat16_run_learns_as_the_float32_run_does(mnist):
    base = TrainConfig(batch_norm=True, max_steps=300, eval_every=150, eval_statistics="precise",
                       precise_bn_batches=50)
    float32, _ = train(base, mnist)
    bfloat16, _ = train(dataclasses.replace(base, compute_dtype="bfloat16"), mnist)
    assert float32.precise_val_accuracy[-1] > 0.95
    assert abs(bfloat16.precise_val_accuracy[-1] - float32.precise_val_accuracy[-1]) < ACCURACY_MARGIN
    assert abs(bfloat16.train_loss[-1] - float32.train_loss[-1]) < LOSS_MARGIN
    assert not np.array_equal(bfloat16.train_loss, float32.train_loss)  # really another arithmetic
