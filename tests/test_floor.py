"""The dependency floor that pyproject.toml declares is the one CI installs
(.ci/floor.txt), and the Colab notebook reads the same jax floor."""

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, str]:
    """The library's floor and the experiments extra's (what CI's floor pass installs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["experiments"]:
        name, version = re.fullmatch(r"([\w-]+)>=([\w.]+)", requirement).groups()
        floors[name] = version
    return floors


def pinned() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "floor.txt").read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def same_version(a: str, b: str) -> bool:
    as_tuple = lambda version: tuple(int(part) for part in version.split("."))  # noqa: E731
    pad = lambda parts: parts + (0,) * (3 - len(parts))  # noqa: E731
    return pad(as_tuple(a)) == pad(as_tuple(b))


def test_ci_pins_exactly_the_declared_floor():
    floors, pins = declared_floors(), pinned()
    assert set(floors) <= set(pins), f"not pinned in .ci/floor.txt: {set(floors) - set(pins)}"
    for name, version in floors.items():
        assert same_version(pins[name], version), f"{name}: pyproject says >={version}, .ci/floor.txt pins {pins[name]}"
    assert pins["jaxlib"] == pins["jax"]


def test_colab_install_cell_finds_the_jax_floor():
    notebook = json.loads((ROOT / "notebooks" / "colab_tpu.ipynb").read_text())
    install_cell = "".join(next(cell["source"] for cell in notebook["cells"]
                                if cell["cell_type"] == "code" and "jax_floor" in "".join(cell["source"])))
    pattern = re.search(r're\.search\(r\'(.+?)\', pathlib', install_cell).group(1)
    found = re.search(pattern, (ROOT / "pyproject.toml").read_text())
    assert found is not None and found.group(1) == declared_floors()["jax"]
