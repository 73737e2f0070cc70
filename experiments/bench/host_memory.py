"""Page faults of the host process, and whether glibc's malloc can give XLA:CPU huge pages.

XLA:CPU allocates an executable's temporaries anew on every call. glibc serves an allocation above
its mmap threshold (at most 32 MiB) with a fresh `mmap`, so once a mixer's temporaries outgrow it,
every call first-touches every page of them again: one minor page fault per 4 KiB, ~2 us each on the
2-core VM the README's CPU tables come from. That is a step in time per token where the temporaries
cross 32 MiB (ssd between T = 4K and 8K at B = 1, H = 4, D = 64: +40%), which a fitted scaling
exponent reads as super-linear work. On a host whose transparent huge pages are in "madvise" mode,
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc ask for huge pages (2 MiB: 512x fewer faults);
in "always" mode the kernel does so unasked. Smaller temporaries come from the heap, but glibc
returns a freed heap top to the kernel past its trim threshold, and the next call faults it in again
(Gated DeltaNet at T = 4096, 13 MiB of temporaries: 82 ms and ~4,500 faults per call with results of
earlier calls held, 73 ms without); a trim threshold above any heap, a fixed 32 MiB mmap threshold and
one malloc arena (XLA runs executables on its own threads, whose arenas are trimmed on their own) keep
that memory in the process: 0 faults per call (`STEADY_MALLOC_TUNABLES`). The benchmark reports the
faults per call (`page_faults_per_call`) and says when this host pays them (`huge_page_advice`).
"""
from __future__ import annotations

import os
import resource
import sys

THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Huge pages for malloc, no trimming of the heap, the mmap threshold fixed at its 32 MiB maximum, one arena.
STEADY_MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=2147483647:"
                          "glibc.malloc.mmap_threshold=33554432:glibc.malloc.arena_max=1")
PAGE_BYTES = resource.getpagesize()


def minor_page_faults() -> int:
    """Minor page faults of this process so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def transparent_huge_page_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode ("always", "madvise" or "never"), or None off Linux / when unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    selected = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return selected[0] if selected else None


def _settings(tunables: str | None) -> dict[str, str]:
    return dict(item.split("=", 1) for item in (tunables or "").split(":") if "=" in item)


def malloc_uses_huge_pages(tunables: str | None) -> bool:
    """Whether a GLIBC_TUNABLES value turns on malloc's huge pages (glibc.malloc.hugetlb=1 or 2)."""
    return _settings(tunables).get("glibc.malloc.hugetlb", "0") in ("1", "2")


def malloc_keeps_freed_memory(tunables: str | None) -> bool:
    """Whether a GLIBC_TUNABLES value holds the settings of STEADY_MALLOC_TUNABLES that keep freed memory
    in the process (the trim and mmap thresholds and one arena)."""
    settings = _settings(tunables)
    return all(settings.get(key) == value for key, value in _settings(STEADY_MALLOC_TUNABLES).items()
               if key != "glibc.malloc.hugetlb")


def huge_page_advice(thp_mode: str | None = None, tunables: str | None = None) -> str | None:
    """A note when XLA's temporaries will be page-faulted on every call here, else None. Arguments
    default to this host's THP mode and this process's GLIBC_TUNABLES."""
    if not sys.platform.startswith("linux"):
        return None
    thp_mode = transparent_huge_page_mode() if thp_mode is None else thp_mode
    tunables = os.environ.get("GLIBC_TUNABLES") if tunables is None else tunables
    if thp_mode not in ("always", "madvise"):
        return (f"transparent huge pages are {thp_mode or 'unknown'} here: XLA temporaries over 32 MiB are "
                "page-faulted on every call (see the faults column)")
    huge = thp_mode == "always" or malloc_uses_huge_pages(tunables)
    if huge and malloc_keeps_freed_memory(tunables):
        return None
    why = ("malloc may hand freed heap memory back to the kernel (trim and mmap thresholds, arenas)" if huge else
           "transparent huge pages are 'madvise' and glibc.malloc.hugetlb is not set, so blocks over 32 MiB "
           "are mapped afresh")
    return (f"XLA temporaries may be page-faulted on every call here (see the faults column): {why}; rerun "
            f"under GLIBC_TUNABLES={STEADY_MALLOC_TUNABLES} for times without that")
