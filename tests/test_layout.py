"""bnjax's folders are its layers: a module imports only modules of its own
folder or of the folders below it (anywhere in a module: a lazy import
inside a function counts too), and no two modules import each other, so a
reader can follow the code downwards without climbing back up."""

import ast
import importlib
from pathlib import Path

BNJAX = Path(__file__).resolve().parents[1] / "bnjax"

# bnjax's folders, lowest first (docs/layout.md draws them); "" is the
# package itself: `import bnjax` (the front door) and `python -m bnjax`.
LAYERS = ("support", "data", "bn", "nets", "training", "engine", "")


def module_name(path: Path) -> str:
    """"training.steps" for bnjax/training/steps.py, "__main__" for bnjax/__main__.py."""
    return ".".join(path.relative_to(BNJAX).with_suffix("").parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in BNJAX.rglob("*.py")}


def layer_of(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


def bnjax_imports(path: Path, known: set[str]) -> set[str]:
    """The bnjax modules `path` imports, by module name ("training.steps", ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnjax"):
            base = node.module.removeprefix("bnjax").removeprefix(".")
            for alias in node.names:  # `from bnjax.bn import nnx` imports a module, `from bnjax.bn.nnx import X` a name
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in known else base or "__init__")
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("bnjax.") for alias in node.names if alias.name.startswith("bnjax."))
    return found - {module_name(path) if path.is_relative_to(BNJAX) else path.stem}


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: bnjax_imports(path, known) for name, path in modules().items()}


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
    graph = import_graph()
    assert graph["engine.launch"] >= {"engine.loop", "engine.strategy"}  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found():
    assert find_cycle({"engine": {"train"}, "train": {"engine"}}) == ["engine", "train", "engine"]
    assert find_cycle({"engine": {"train"}, "train": {"models"}}) is None


def test_every_module_sits_in_a_layer_folder_and_imports_only_its_folder_or_those_below():
    graph = import_graph()
    assert {layer_of(module) for module in graph} == set(LAYERS), "a folder missing from LAYERS, or one without code"
    for module, imported in sorted(graph.items()):
        allowed = set(LAYERS[:LAYERS.index(layer_of(module)) + 1])
        above = sorted(name for name in imported if layer_of(name) not in allowed)
        assert not above, f"{module} ({layer_of(module) or 'bnjax'}) imports {above} from above"


def test_the_layer_rule_catches_an_import_from_above(tmp_path):
    # bn importing training: the arrow the rule exists to forbid
    path = tmp_path / "batchnorm.py"
    path.write_text("from bnjax.training.steps import train_step\n")
    imported = bnjax_imports(path, {"training.steps"})
    assert imported == {"training.steps"}
    assert layer_of("training.steps") not in LAYERS[:LAYERS.index("bn") + 1]


def test_the_front_door_names_live_where_it_says():
    import bnjax

    for name, module in bnjax._EXPORTS.items():
        assert layer_of(module.removeprefix("bnjax.")) in LAYERS, module
        value = getattr(bnjax, name)
        assert value is (importlib.import_module(module) if name == "nnx" else getattr(importlib.import_module(module), name))
    assert sorted(bnjax.__all__) == sorted(bnjax._EXPORTS)


def test_the_plain_loop_reaches_batchnorm_in_three_calls():
    """train -> train_step (training/steps.py) -> the net's __call__ -> BatchNorm.__call__:
    the plain loop imports the step, the step the nets, the nets the BN, and none of them the engine."""
    graph = import_graph()
    assert "training.steps" in graph["training.train"]
    assert {"nets.models", "nets.recurrent"} <= graph["training.steps"]
    assert "bn.batchnorm" in graph["nets.models"]
    assert not any(layer_of(name) == "engine" for name in graph["training.train"] | graph["training.steps"])


MAX_FUNCTION_LINES, MAX_PARAMETERS = 60, 8


def oversized_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, lines, parameters) of each function over MAX_FUNCTION_LINES lines
    or MAX_PARAMETERS parameters: its lines from `def` to its end, its
    docstring not counted (a public function documents every argument); its
    parameters without the keyword-only options that have defaults."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            parameters = len(args.posonlyargs) + len(args.args) + sum(default is None for default in args.kw_defaults)
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines -= first.end_lineno - first.lineno + 1
            if lines > MAX_FUNCTION_LINES or parameters > MAX_PARAMETERS:
                found.append((node.name, lines, parameters))
    return found


def test_no_function_is_over_60_lines_or_8_parameters():
    oversized = {module: found for module, path in modules().items() if (found := oversized_functions(path.read_text()))}
    assert oversized == {}


def test_the_size_rule_catches_a_long_function_and_a_long_signature():
    long_body = "def long():\n" + "    x = 1\n" * 60
    assert oversized_functions(long_body) == [("long", 61, 0)]
    assert oversized_functions(long_body.replace("():\n", '():\n    """A\n    docstring."""\n', 1)) == [("long", 61, 0)]
    assert oversized_functions("def wide(a, b, c, d, e, f, g, h, i):\n    pass\n") == [("wide", 2, 9)]
    assert oversized_functions("def options(a, *, b=1, c=2, d=3, e=4, f=5, g=6, h=7, i=8):\n    pass\n") == []


def test_every_function_of_the_front_door_documents_its_arguments_and_return_value():
    import inspect

    import bnjax

    functions = {name: getattr(bnjax, name) for name in bnjax.__all__ if inspect.isfunction(getattr(bnjax, name))}
    assert len(functions) >= 9
    undocumented = {name for name, function in functions.items()
                    if "Returns:" not in (function.__doc__ or "")
                    or (inspect.signature(function).parameters and "Args:" not in (function.__doc__ or ""))}
    assert undocumented == set()


def test_the_command_line_trains_through_the_front_door():
    assert "engine.loop" not in bnjax_imports(BNJAX / "__main__.py", set(modules()))
    assert "bnjax.train_many(" in (BNJAX / "__main__.py").read_text()
