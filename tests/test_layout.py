"""bnjax's modules import each other without a cycle (anywhere in a module:
a lazy import inside a function counts too), so a reader can follow the code
downwards without climbing back up."""

import ast
from pathlib import Path

BNJAX = Path(__file__).resolve().parents[1] / "bnjax"


def bnjax_imports(path: Path) -> set[str]:
    """The bnjax modules `path` imports, by module name ("train", "engine", ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnjax."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "bnjax":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bnjax."))
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None."""
    visiting, done = [], set()

    def visit(module):
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        if module in done:
            return None
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_bnjax_modules_import_each_other_without_a_cycle():
    graph = {path.stem: bnjax_imports(path) for path in BNJAX.glob("*.py")}
    assert graph["engine"] >= {"loop", "strategy"}  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_training_code_reads_downwards():
    """config <- steps <- loop <- train / engine: each layer imports only
    those below it, so there is one loop and every launch path goes through it."""
    graph = {path.stem: bnjax_imports(path) for path in BNJAX.glob("*.py")}
    assert "steps" in graph["loop"] and "loop" in graph["train"] and "loop" in graph["engine"]
    assert not graph["steps"] & {"loop", "train", "engine"}
    assert not graph["loop"] & {"train", "engine", "workers"}
    assert not graph["engine"] & {"train"}


def test_a_cycle_is_found():
    assert find_cycle({"engine": {"train"}, "train": {"engine"}}) == ["engine", "train", "engine"]
    assert find_cycle({"engine": {"train"}, "train": {"models"}}) is None


# bnjax's layers, lowest first (docs/layout.md draws them): a module imports
# only modules of its own layer or of a layer below.
LAYERS = {
    "support": {"checks", "atomic", "provenance", "xla_flags"},
    "the BN library": {"batchnorm", "nnx", "update_bn", "checkup", "conv", "models", "recurrent", "nnx_model", "convert"},
    "training": {"config", "steps", "runs", "schedule", "precise_bn", "evaluation", "checkpoint", "strategy", "loop",
                 "train", "data", "data_sources"},
    "launching": {"engine", "workers", "compilation_cache", "__main__", "__init__"},
}


def test_every_module_imports_only_its_layer_or_those_below():
    graph = {path.stem: bnjax_imports(path) for path in BNJAX.glob("*.py")}
    assert set(graph) == set().union(*LAYERS.values()), "a module missing from LAYERS, or a name that is no module"
    below = set()
    for layer, modules in LAYERS.items():
        below |= modules
        for module in sorted(modules):
            assert graph[module] <= below, f"{module} ({layer}) imports {sorted(graph[module] - below)} from above"
