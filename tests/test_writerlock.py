"""The one-writer lock of an agent's history (writerlock.py)."""
import os
import subprocess
import sys

from memfuse.writerlock import WriterLock


def test_two_holders_exclude_each_other_and_a_release_lets_the_next_in(tmp_path):
    path = tmp_path / "state" / "memory.lock"
    first, second = WriterLock(path), WriterLock(path)
    assert first.try_acquire() and first.held
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert not second.try_acquire()  # one process, two open files: excluded all the same
    assert not second.acquire(0.2)
    first.release()
    assert second.acquire(0.2)
    second.release()
    second.release()  # nothing held: nothing happens


def test_a_waiting_acquire_gives_up_when_asked(tmp_path):
    path = tmp_path / "memory.lock"
    holder = WriterLock(path)
    assert holder.try_acquire()
    asked = []
    assert not WriterLock(path).acquire(30, give_up=lambda: asked.append(1) or True)
    assert asked == [1]
    holder.release()


def test_the_lock_goes_with_a_process_that_dies_holding_it(tmp_path):
    path = tmp_path / "memory.lock"
    code = ("import sys; from pathlib import Path; from memfuse.writerlock import WriterLock; "
            "assert WriterLock(Path(sys.argv[1])).try_acquire(); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    lock = WriterLock(path)
    assert lock.try_acquire()
    lock.release()
