"""A failed write never leaves a half-written file behind."""

import json

import pytest

from bnjax.atomic import atomic_write, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"runs": [1]})
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as file:
            file.write('{"runs": [1, 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"runs": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
