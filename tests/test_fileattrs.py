"""The record of times and modes kept across mounts (fileattrs.py)."""
import stat

import pytest

from memfuse import fileattrs
from memfuse.fileattrs import Attrs


def test_the_record_round_trips_privately_and_a_missing_one_is_empty(tmp_path):
    path = tmp_path / "memory.attrs"
    assert fileattrs.load(path) == {}
    found = {"": Attrs(0o711, 1, 2, 3), "system/human.md": Attrs(0o600, 4, 5, 6)}
    fileattrs.save(path, found)
    assert fileattrs.load(path) == found
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (tmp_path / "memory.attrs.tmp").exists()


@pytest.mark.parametrize("content", [b"not json", b'{"version": 2, "files": {}}',
                                     b'{"version": 1, "files": {"a.md": [1, 2]}}',
                                     b'{"version": 1, "files": {"a.md": ["x", 1, 2, 3]}}',
                                     b'{"version": 1}', b"[]"])
def test_a_record_that_cannot_be_read_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "memory.attrs"
    path.write_bytes(content)
    with pytest.raises(fileattrs.AttrsError, match="memory.attrs"):
        fileattrs.load(path)
