"""The entry points' persistent compilation cache (bnjax/support/compilation_cache.py):
where it goes, that a second process loads instead of compiling, and that a
user's own settings win. Each case runs in a fresh process (the cache is
process-wide JAX configuration)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Turns the cache on, compiles one small program, and reports the directory
# in use and whether JAX served the program from the persistent cache.
SCRIPT = """
import json, jax, jax.numpy as jnp
from bnjax.support.compilation_cache import use_persistent_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
directory = use_persistent_cache()
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"directory": directory, "loaded": bool(hits)}))
"""


def run(env_changes: dict) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_its_programs_from_the_bnjax_cache(tmp_path):
    env = {"BNJAX_CACHE_DIR": str(tmp_path)}
    first, second = run(env), run(env)
    assert first == {"directory": str(tmp_path / "jax"), "loaded": False}
    assert any((tmp_path / "jax").iterdir())
    assert second == {"directory": str(tmp_path / "jax"), "loaded": True}


def test_the_users_own_cache_and_its_switch_win(tmp_path):
    own = tmp_path / "own"
    assert run({"BNJAX_CACHE_DIR": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(own)})["directory"] == str(own)
    assert not (tmp_path / "jax").exists()
    assert run({"BNJAX_CACHE_DIR": str(tmp_path), "BNJAX_COMPILATION_CACHE": "0"}) == {"directory": None,
                                                                                      "loaded": False}
    assert not (tmp_path / "jax").exists()
