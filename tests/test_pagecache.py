"""PageCache: keep_cache only when the kernel's pages are known to hold what the file shows."""
from memfuse.pagecache import PageCache


def test_a_second_open_of_the_same_version_keeps_the_pages():
    cache = PageCache()
    assert not cache.opened(5, 1, version=1, writable=False)  # drops older pages
    cache.released(5, 1)
    assert cache.opened(5, 2, version=1, writable=False)


def test_a_new_version_drops_the_pages_once():
    cache = PageCache()
    cache.opened(5, 1, version=1, writable=False)
    cache.released(5, 1)
    assert not cache.opened(5, 2, version=2, writable=False)
    cache.released(5, 2)
    assert cache.opened(5, 3, version=2, writable=False)


def test_a_writer_or_a_reader_of_another_version_makes_the_pages_unknown():
    cache = PageCache()
    cache.opened(5, 1, version=1, writable=False)
    cache.released(5, 1)
    assert not cache.opened(5, 2, version=1, writable=True)  # its writes fill pages
    assert not cache.opened(5, 3, version=1, writable=False)  # the writer is still open
    cache.released(5, 2)
    cache.released(5, 3)
    assert not cache.opened(5, 4, version=1, writable=False)  # unknown since: dropped once
    cache.opened(5, 5, version=2, writable=False)  # 4 still reads version 1
    cache.released(5, 4)
    cache.released(5, 5)
    assert not cache.opened(5, 6, version=2, writable=False)


def test_forget_drops_what_was_known():
    cache = PageCache()
    cache.opened(5, 1, version=1, writable=False)
    cache.released(5, 1)
    cache.forget(5)
    assert not cache.opened(5, 2, version=1, writable=False)
