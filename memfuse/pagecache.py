"""What the kernel's page cache holds of each file, as far as the daemon can know: the answer
to FUSE open's `keep_cache` (FOPEN_KEEP_CACHE).

With `keep_cache` the kernel keeps the pages it has of a file at open, so a warm `cat` is served
without one read request; without it, they are dropped at open (close-to-open consistency). The
kernel fills a file's pages from the reads of every open handle and from its writes, and memfuse
serves each handle the bytes of the version it opened (a snapshot), so the pages are known to
hold the current version only when an open of it dropped the older pages and, since then, every
handle open on the file opened that same version and none could write. Any doubt answers False:
a dropped cache costs one read, a kept stale one would show stale bytes.
"""
from __future__ import annotations


class PageCache:
    """Per inode: the version (tree.Node.version) the kernel's pages are known to hold, and the
    handles open on it (fh -> (version, writable))."""

    def __init__(self) -> None:
        self._holds: dict[int, int] = {}
        self._open: dict[int, dict[int, tuple[int, bool]]] = {}

    def opened(self, inode: int, fh: int, version: int, writable: bool) -> bool:
        """A handle `fh` of `inode` opens showing `version`: whether the kernel may keep its
        pages (the `keep_cache` of this open)."""
        handles = self._open.get(inode)
        if handles is None:  # the usual case: no other handle open on the file
            handles = self._open[inode] = {}
            agree = True
        else:
            agree = all(v == version and not w for v, w in handles.values())
        handles[fh] = (version, writable)
        if writable or not agree:
            self._holds.pop(inode, None)  # its writes, or another version's reads, fill pages
            return False
        if self._holds.get(inode) == version:
            return True
        self._holds[inode] = version  # this open drops the pages; reads refill them with it
        return False

    def released(self, inode: int, fh: int) -> None:
        """The handle `fh` of `inode` was released (FUSE release)."""
        handles = self._open.get(inode)
        if handles is not None:
            handles.pop(fh, None)
            if not handles:
                del self._open[inode]

    def forget(self, inode: int) -> None:
        """Nothing is known of `inode`'s pages any more (its content went elsewhere)."""
        self._holds.pop(inode, None)
