"""gitpush without HTTP: what a push's judge reads of the history."""
from memfuse import gitpush
from memfuse.history import HistoryRepo
from memfuse.layout import GIT_MEMORY


def test_a_push_is_judged_reading_only_the_files_that_differ_and_the_kept_ones(tmp_path,
                                                                               monkeypatch):
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    head = repo.commit({"system/a.md": b"a\n", "system/b.md": b"b\n",
                        "skills/pdf/extract.py": b"print()\n"}, b"p <p@x>", "Local edit")
    new = repo.commit({"system/b.md": b"b2\n", "system/c.md": b"c\n"}, b"p <p@x>", "Local edit")
    read = []
    real_blob = HistoryRepo.blob
    monkeypatch.setattr(HistoryRepo, "blob", lambda self, sha: read.append(sha) or real_blob(
        self, sha))
    old, pushed = gitpush.pushed_files(repo, head, new, GIT_MEMORY)
    # a: alike on both sides, never read; the kept file is read on both (its size counts)
    assert old["system/a.md"] == pushed["system/a.md"]
    assert isinstance(pushed["system/a.md"][1], gitpush.Unread)
    assert (old["system/b.md"][1], pushed["system/b.md"][1]) == (b"b\n", b"b2\n")
    assert pushed["system/c.md"][1] == b"c\n" and "system/c.md" not in old
    assert old["skills/pdf/extract.py"][1] == pushed["skills/pdf/extract.py"][1] == b"print()\n"
    assert len(read) == 5  # b twice, c, the kept file twice
    plan = gitpush.plan(old, pushed, {}, GIT_MEMORY)
    assert sorted(plan.changes) == ["system/b.md", "system/c.md"]
    repo.close()
