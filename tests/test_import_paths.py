"""The import paths a Flax user types, wherever they type them: no Flax module
is made by importing any part of bnjax, so a layer works however and
wherever it is first reached (here: first from inside a compact method)."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_importing_any_part_of_bnjax_makes_no_flax_module():
    result = run_python("""
        import importlib, pkgutil
        import flax.linen as nn
        made = []
        original = nn.Module.__post_init__
        def counting(self):
            made.append(type(self).__name__)
            return original(self)
        nn.Module.__post_init__ = counting
        import bnjax
        names = sorted(info.name for info in pkgutil.walk_packages(bnjax.__path__, "bnjax.")
                       if info.name != "bnjax.__main__")
        for name in names:
            importlib.import_module(name)
        for name in bnjax.__all__:
            getattr(bnjax, name)
        print(len(names), "modules;", made)
    """)
    assert result.returncode == 0, result.stderr
    count, made = result.stdout.strip().split(";")
    assert int(count.split()[0]) > 20 and made.strip() == "[]"


def test_a_layer_first_reached_inside_a_compact_method_can_be_applied():
    result = run_python("""
        import functools
        import flax.linen as nn
        import jax, jax.numpy as jnp
        import bnjax  # the front door only: bnjax.BatchNorm's module is imported below, on first use

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                norm = functools.partial(bnjax.BatchNorm, use_running_average=not train, momentum=0.9)
                return norm()(nn.Dense(4)(x))

        x = jnp.arange(12.0).reshape(3, 4)
        variables = Net().init(jax.random.key(0), x, train=False)
        y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
        print(sorted(variables["params"]), sorted(updates["batch_stats"]))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['BatchNorm_0', 'Dense_0'] ['BatchNorm_0']"


def test_bnjax_nnx_is_a_module_of_its_own():
    result = run_python("""
        import bnjax.nnx
        from bnjax.nnx import BatchNorm, checkup, update_bn
        import bnjax, flax.nnx
        print(bnjax.nnx.BatchNorm is BatchNorm, issubclass(BatchNorm, flax.nnx.BatchNorm), callable(update_bn),
              callable(checkup), bnjax.nnx.__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "True", "bnjax.nnx"]


def test_type_checkers_see_every_name_of_the_front_door_where_it_lives():
    import ast
    from pathlib import Path

    import bnjax

    tree = ast.parse(Path(bnjax.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                   "TYPE_CHECKING")
    seen = {}
    for node in guarded.body:
        for alias in node.names:
            seen[alias.name] = node.module if node.module != "bnjax" else f"bnjax.{alias.name}"
    assert seen == bnjax._EXPORTS


def test_the_front_doors_functions_are_annotated():
    import inspect
    import typing

    import bnjax
    import bnjax.nnx

    callables = [getattr(bnjax, name) for name in bnjax.__all__ if name != "nnx"]
    callables += [bnjax.nnx.update_bn, bnjax.nnx.checkup]
    for value in callables:
        function = value.__init__ if inspect.isclass(value) else value
        hints = typing.get_type_hints(function)  # every annotation resolves, too
        names = [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]
        assert set(names) <= set(hints), f"{value.__qualname__}: {sorted(set(names) - set(hints))} unannotated"
        if not inspect.isclass(value):
            assert "return" in hints, f"{value.__qualname__}: no return annotation"
