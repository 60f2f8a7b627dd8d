"""The block map beside the history (blockmap.py): saved atomically and privately, read back,
and turned with the history's files into the blocks a local-first mount shows."""
import json
import os
import stat

import pytest

from memfuse import blockmap
from memfuse.blockfile import render
from memfuse.blockmap import BlockMapError, Record
from memfuse.model import Block

HUMAN = Block("block-1", "human", "The human.\n", 2000, "About the human")
NOTES = Block("block-2", "projects/notes", "Notes.\n", 500, None, tags=("owner:agent-1",))
LOCKED = Block("block-3", "rules", "Fixed.\n", 100, "Rules", read_only=True)


def shown():
    return [("system/human.md", HUMAN, True), ("projects/notes.md", NOTES, False),
            ("system/rules.md", LOCKED, True)]


def test_a_saved_map_reads_back_and_gives_the_blocks_back_with_the_history(tmp_path):
    path = tmp_path / "memory.blocks"
    found = blockmap.records(shown())
    blockmap.save(path, found)
    assert blockmap.load(path) == found
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "The human" not in path.read_text()  # no values: history holds the content
    files = {p: render(b) for p, b, _ in shown()}
    attached, owned = blockmap.blocks(blockmap.load(path), files)
    assert attached == [HUMAN, LOCKED] and owned == [NOTES]


def test_blocks_the_server_has_not_made_yet_are_left_out():
    provisional = Block("local-7", "draft", "", 100)
    assert [r.id for r in blockmap.records([*shown(), ("draft.md", provisional, False)])] == [
        "block-2", "block-1", "block-3"]  # sorted by path


def test_a_record_without_a_history_file_or_with_a_broken_one_is_left_out(caplog):
    found = blockmap.records(shown())
    files = {"system/human.md": render(HUMAN), "projects/notes.md": b"---\nlimit: [\n---\nx"}
    attached, owned = blockmap.blocks(found, files)
    assert attached == [HUMAN] and owned == []
    assert "system/rules.md: block block-3 is in the block map but not in the history" in (
        caplog.text)
    assert "projects/notes.md: the history's file is not a block file" in caplog.text


def test_a_failed_save_leaves_the_old_map(tmp_path, monkeypatch):
    path = tmp_path / "memory.blocks"
    blockmap.save(path, blockmap.records(shown()[:1]))
    before = path.read_bytes()

    def crash(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        blockmap.save(path, blockmap.records(shown()))
    assert path.read_bytes() == before  # the new map went to a temporary file only


def test_no_map_is_none_and_a_broken_one_says_so(tmp_path):
    path = tmp_path / "memory.blocks"
    assert blockmap.load(path) is None
    for text in ("not json", json.dumps({"version": 99, "blocks": []}),
                 json.dumps({"version": 1, "blocks": [{"path": "a.md"}]})):
        path.write_text(text)
        with pytest.raises(BlockMapError) as caught:
            blockmap.load(path)
        assert str(path) in str(caught.value)


def test_a_record_is_the_block_where_it_is_shown():
    assert Record.of("system/human.md", HUMAN, True) == Record(
        "system/human.md", "block-1", "human", True, False, ())


def test_the_map_records_its_layout_and_an_older_map_is_classic(tmp_path):
    path = tmp_path / "memory.blocks"
    found = blockmap.records([("system/human.md", HUMAN, True)])
    blockmap.save(path, found, "git-memory")
    assert blockmap.read(path) == ("git-memory", found)
    assert blockmap.load(path) == found
    path.write_text(json.dumps({"version": 1, "blocks": []}))  # written before layouts
    assert blockmap.read(path) == ("classic", [])
