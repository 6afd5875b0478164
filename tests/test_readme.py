"""The README's pointers into the code point at the lines they describe."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# (reference as written in the README, text that line range must contain)
EXPECTED = {
    "bnjax/batchnorm.py:138": "running_mean.value, running_var.value = new_mean, new_var",
    "bnjax/batchnorm.py:46": "jax.lax.pmean((mean, mean_of_squares), axis_name)",
    "bnjax/train.py:230": "grads, metrics = jax.lax.pmean((grads, metrics), axis_name)",
    "bnjax/train.py:218-224": 'mutable=["batch_stats"]',
    "bnjax/train.py:252-258": "train=False",
}


def lines_of(reference: str) -> str:
    path, _, span = reference.partition(":")
    first, _, last = span.partition("-")
    lines = (ROOT / path).read_text().splitlines()
    return "\n".join(lines[int(first) - 1 : int(last or first)])


@pytest.mark.parametrize("reference", sorted(EXPECTED))
def test_reference_points_at_its_line(reference):
    assert reference in README
    assert EXPECTED[reference] in lines_of(reference)


def test_every_line_reference_is_checked():
    found = set(re.findall(r"`(bnjax/\w+\.py:\d+(?:-\d+)?)`", README))
    assert found == set(EXPECTED)
