"""A failed write never leaves a half-written file behind."""

import json
import os
import stat

import pytest

from bnjax.support.atomic import atomic_write, write_json


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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "results.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode
