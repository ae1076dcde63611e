"""The page allocator of the paged latent cache: free pages, reference counts, shared prompt prefixes.

A sequence's cache is a list of page ids (its page table); a page holds ``page_size`` consecutive
positions of one sequence. Pages are reference-counted: a prompt's full pages are shared by every
request that starts with the same tokens (``lookup`` / ``register``, keyed by the page's tokens and
the page before it, so a key names the whole prefix), and the sequences of one request (``n``
completions) share every prompt page, the last, partial one copied on write (the engine's job). A
page returns to the free list, and leaves the prefix index, when its last user releases it.
"""

from __future__ import annotations


class OutOfPages(Exception):
    """Not enough free pages for an allocation."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages}, page_size={page_size}: both must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self.refs = [0] * num_pages
        self._index: dict[tuple, int] = {}  # (previous page or -1, the page's tokens) -> page
        self._key: dict[int, tuple] = {}  # page -> its key in _index

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages, each with one reference; OutOfPages (nothing taken) if fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"{n} pages wanted, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more reference to each of ``pages`` (a new user of them)."""
        for p in pages:
            if self.refs[p] < 1:
                raise ValueError(f"page {p} is free: it cannot be shared")
            self.refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """One reference less to each of ``pages``; a page nobody uses is free again."""
        for p in pages:
            if self.refs[p] < 1:
                raise ValueError(f"page {p} released more often than it was taken")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                key = self._key.pop(p, None)
                if key is not None:
                    del self._index[key]
                self._free.append(p)

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        """The pages holding the longest indexed prefix of ``tokens``, at most ``limit`` pages, each
        shared (one more reference) with the caller. A page's key holds the page before it, and a
        holder of a page holds every page before it, so a key always names a live prefix."""
        found, previous, s = [], -1, self.page_size
        for i in range(limit):
            page = self._index.get((previous, tuple(tokens[i * s : (i + 1) * s])))
            if page is None:
                break
            found.append(page)
            previous = page
        self.share(found)
        return found

    def register(self, tokens: list[int], pages: list[int], full: int) -> None:
        """Indexes the first ``full`` pages of a sequence (``pages``, holding ``tokens``): their
        entries are written, so later requests with the same prefix may share them."""
        previous, s = -1, self.page_size
        for i in range(full):
            key = (previous, tuple(tokens[i * s : (i + 1) * s]))
            if self._index.setdefault(key, pages[i]) != pages[i]:
                return  # the same prefix, computed alongside under other pages, is indexed already
            self._key[pages[i]] = key
            previous = pages[i]
