"""Transparent huge pages for the training step's working memory.

XLA:CPU allocates each execution's temporary buffer (217 MiB for the demo
config's step) with `malloc` and frees it when the step ends. glibc serves an
allocation that large with a fresh `mmap`, so every step page-faults on each
4 KiB page of it again: 55,600 faults and ~0.1 s of kernel time per demo step of
~0.6 s. With glibc's `glibc.malloc.hugetlb=1` tunable such mappings are advised
as transparent huge pages (2 MiB): ~440 faults per step, and the demo step ran
10 % faster (three alternating pairs of `python -m faceage_jax.bench step
--config configs/demo.py` runs, which print the faults per step: +10, +13 and
0 %). The computation is the same; only the memory under it changes.

glibc reads tunables only when a process starts, so the entry points call
`reexec_with_huge_pages` before anything else (before flags, files or other
processes are touched): it restarts the same command, in the same process (same
PID), with the tunable added to `GLIBC_TUNABLES`. Child processes inherit it.
It restarts at most once, and not at all when `GLIBC_TUNABLES` already names
`glibc.malloc.hugetlb` (`glibc.malloc.hugetlb=0` opts out, e.g. under a
debugger), with another C library or a glibc older than 2.35, where the kernel's
transparent huge pages are `never`, or when `JAX_PLATFORMS` leaves out the CPU.
Standard library only: it runs before flags are parsed and before JAX starts
a backend.
"""

import os
import sys
from collections.abc import Callable, Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
MIN_GLIBC = (2, 35)  # The first glibc with the tunable.
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set in the restarted process: at most one restart, whatever the loader does
# with GLIBC_TUNABLES (it drops tunables for setuid or capability-raised programs).
RESTARTED = "FACEAGE_JAX_RESTARTED_FOR_HUGE_PAGES"


def glibc_version() -> tuple[int, ...] | None:
    """(major, minor) of the running glibc; None with another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    return tuple(int(part) for part in version.split(".")[:2])


def transparent_huge_pages_available(path: str = THP_ENABLED) -> bool:
    """Whether the kernel grants huge pages on request (`always` or `madvise` selected)."""
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def wants_reexec(
    environ: Mapping[str, str], glibc: tuple[int, ...] | None, huge_pages_available: bool
) -> bool:
    """Whether a restart with the tunable would change anything (see the module doc)."""
    if RESTARTED in environ or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False  # Restarted already, or the user's own choice.
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return False  # No XLA:CPU step here.
    return glibc is not None and glibc >= MIN_GLIBC and huge_pages_available


def reexec_with_huge_pages(
    environ: Mapping[str, str] = os.environ,
    argv: Sequence[str] | None = None,
    execve: Callable[[str, Sequence[str], Mapping[str, str]], None] = os.execve,
    glibc: tuple[int, ...] | None = None,
    huge_pages_available: bool | None = None,
) -> bool:
    """Restarts this command with `glibc.malloc.hugetlb=1` where that helps; see the module doc.

    Call it first in an entry point's `__main__` block. `argv` defaults to the
    interpreter's own command line (`sys.orig_argv`: `-m`, `-X` and the like
    included), run by this interpreter (`sys.executable`). Returns False when it
    leaves the process as it is (a failed restart is reported on stderr and
    training goes on without huge pages); a restart does not return. The other arguments are
    for tests.
    """
    glibc = glibc_version() if glibc is None else glibc
    if huge_pages_available is None:
        huge_pages_available = transparent_huge_pages_available()
    if not sys.executable or not wants_reexec(environ, glibc, huge_pages_available):
        return False
    previous = environ.get("GLIBC_TUNABLES", "")
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{previous}:{SETTING}" if previous else SETTING
    env[RESTARTED] = "1"
    argv = [sys.executable, *(sys.orig_argv if argv is None else argv)[1:]]
    # Logging is not set up yet (flags are parsed after the restart): plain stderr.
    say(f"Restarting with GLIBC_TUNABLES={SETTING} (see faceage_jax/huge_pages.py).")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        execve(sys.executable, argv, env)
    except OSError as error:
        say(f"Could not restart with {SETTING} ({error}); going on without it.")
        return False
    return True


def say(message: str) -> None:
    if sys.stderr is not None:
        print(message, file=sys.stderr, flush=True)
