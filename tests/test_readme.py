"""The README and docs/ pages point at code and files that exist and still say
what the pages describe."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (reference as written on the pages: file::function or file::Class.method,
#  text that definition must contain)
EXPECTED = {
    "bnjax/bn/batchnorm.py::BatchNorm.__call__": "variable.value = new_running[name]",
    "bnjax/nets/recurrent.py::StepStatistics.update": "variable.value = variable.value.at[:recorded].set(moved)",
    "bnjax/bn/batchnorm.py::batch_statistics": "jax.lax.pmean(means, axis_name, axis_index_groups=axis_index_groups)",
    "bnjax/bn/batchnorm.py::batch_norm_train": "momentum",
    "bnjax/bn/batchnorm.py::running_average_weights": "(1.0 - momentum) / (1.0 - momentum**t)",
    "bnjax/bn/batchnorm.py::batch_renorm_train": "jax.lax.stop_gradient(jnp.clip(std / stats[\"renorm_std\"], 1.0 / r_max, r_max))",
    "bnjax/bn/batchnorm.py::ghost_batch_statistics": "x.reshape(batch // ghost_batch_size, ghost_batch_size, *x.shape[1:])",
    "bnjax/training/precise_bn.py::recompute_batch_stats": "precise_statistics(",
    "bnjax/training/steps.py::train_step_body": 'mutable=["batch_stats"]',
    "bnjax/training/steps.py::_eval_totals": "train=False",
    "bnjax/engine/loop.py::train_runs": "for next_eval in _evaluation_steps(",
    "bnjax/training/train.py::train": "state, metrics = train_step(state,",
    "bnjax/engine/loop.py::_chunk": "jax.lax.fori_loop(0, num_steps",
    "bnjax/engine/loop.py::_step": "jax.shard_map",
    "experiments/recurrent_bn.py::shared_over_steps": 'variance="pooled"',
    "bnjax/engine/launch.py::train_many": "finished.issuperset(group)",
    "bnjax/training/checkpoint.py::read_checkpoint": 'run.get("sha256") != digest(state',
    "experiments/results.py::load_results": "_problem_with_run(run)",
    "bnjax/training/history.py::has_diverged": "train_loss > DIVERGED_LOSS",
    "bnjax/support/provenance.py::effective_precision": "_FLOAT32_ARITHMETIC.get(platform_name, {})",
}
REFERENCE = re.compile(r"`((?:bnjax(?:/\w+)?|experiments|benchmarks)/\w+\.py)::([\w.]+)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def definition_source(path: str, qualified_name: str) -> str | None:
    """The source of `qualified_name` (a function, class or Class.method) in `path`, or None."""
    source = (ROOT / path).read_text()
    scope = ast.parse(source).body
    node = None
    for name in qualified_name.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            return None
        scope = node.body
    return ast.get_source_segment(source, node)


def references() -> set[str]:
    return {f"{path}::{name}" for page in PAGES for path, name in REFERENCE.findall(page.read_text())}


@pytest.mark.parametrize("reference", sorted(EXPECTED))
def test_reference_names_code_that_says_what_the_pages_describe(reference):
    assert reference in references()
    path, _, name = reference.partition("::")
    source = definition_source(path, name)
    assert source is not None, f"{name} is not defined in {path}"
    assert EXPECTED[reference] in source


def test_every_code_reference_is_checked():
    assert references() == set(EXPECTED)


TEST_REFERENCE = re.compile(r"`(tests/\w+\.py)::(\w+)`")


def test_every_test_a_page_names_exists():
    # docs/reliability.md names the test that holds each promise.
    named = {(path, name) for page in PAGES for path, name in TEST_REFERENCE.findall(page.read_text())}
    assert len(named) >= 20
    missing = [f"{path}::{name}" for path, name in sorted(named) if definition_source(path, name) is None]
    assert not missing, missing


def test_no_page_points_at_line_numbers():
    for page in PAGES:
        assert not re.findall(r"`bnjax/\w+\.py:\d+", page.read_text()), page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_and_images_exist(page):
    targets = [target for target in LINK.findall(page.read_text()) if "://" not in target]
    missing = [target for target in targets if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def test_definition_lookup_can_fail():
    assert definition_source("bnjax/training/train.py", "no_such_function") is None
    assert definition_source("bnjax/bn/batchnorm.py", "BatchNorm.no_such_method") is None


def test_ci_runs_the_readme_install_and_test_commands():
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("```bash", 1)[1].split("```")[0]
    commands = {line.split("#", 1)[1].strip(): line.split("#", 1)[0].strip()
                for line in quick_start.splitlines() if "#" in line}
    install = next(command for comment, command in commands.items() if comment.startswith("install"))
    tests = next(command for comment, command in commands.items() if comment.startswith("run the tests"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines and tests in ci_lines, (install, tests)
