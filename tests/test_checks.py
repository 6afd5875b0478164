"""The shared value checks (bnjax/support/checks.py): one line naming the value and what is allowed."""

import pytest

from bnjax.support.checks import check_bool, check_choice, check_integer, check_positive_real


@pytest.mark.parametrize("call, message", [
    (lambda: check_integer("batch_size", 0), "batch_size must be a positive integer, got 0"),
    (lambda: check_integer("batch_size", True), "batch_size must be a positive integer, got True"),
    (lambda: check_integer("batch_size", 2.0), "batch_size must be a positive integer, got 2.0"),
    (lambda: check_integer("max_steps", -3, optional=True), "max_steps must be a positive integer or None, got -3"),
    (lambda: check_integer("seed", -1, minimum=0), "seed must be a non-negative integer, got -1"),
    (lambda: check_positive_real("learning_rate", float("inf")), "learning_rate must be a positive finite number, got inf"),
    (lambda: check_bool("shuffle", 1), "shuffle must be True or False, got 1"),
    (lambda: check_choice("activation", "swish", {"relu", "elu"}), "unknown activation 'swish'; allowed: elu, relu"),
])
def test_a_bad_value_is_one_line_naming_it(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_good_values_pass():
    check_integer("batch_size", 1)
    check_integer("max_steps", None, optional=True)
    check_integer("seed", 0, minimum=0)
    check_positive_real("learning_rate", 1e-3)
    check_bool("shuffle", False)
    check_choice("activation", "relu", {"relu"})
