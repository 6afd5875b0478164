"""A package a user can pin and cite: its version, license, changelog and
type information, and a slim install whose BN library imports nothing beyond
jax, flax, optax and numpy."""

import importlib.metadata
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import bnjax

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_version_is_one_value_the_changelog_describes():
    assert PROJECT["dynamic"] == ["version"] and bnjax.__version__ == importlib.metadata.version("bnjax")
    assert f"## {bnjax.__version__} " in (ROOT / "CHANGELOG.md").read_text()


def test_license_and_type_information_ship_with_it():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert (ROOT / "bnjax" / "py.typed").exists()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["bnjax"]


def test_a_plain_install_brings_the_bn_library_and_nothing_else():
    assert [requirement.split(">=")[0] for requirement in PROJECT["dependencies"]] == ["jax", "flax", "optax",
                                                                                       "numpy"]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import flax.linen, flax.nnx, jax, numpy, optax
        before = {name.split(".")[0] for name in sys.modules}
        import bnjax, bnjax.nnx
        for name in ("BatchNorm", "Renorm", "keras_bn", "update_bn", "checkup", "Checkup", "accuracy"):
            getattr(bnjax, name)
        print(sorted({name.split(".")[0] for name in sys.modules} - before - set(sys.stdlib_module_names)))
    """)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['bnjax']"
