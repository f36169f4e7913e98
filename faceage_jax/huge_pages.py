"""Transparent huge pages for the step's working memory on CPU hosts.

XLA:CPU allocates each execution's temporary buffer (217 MiB for the demo
config's step) with `malloc` and frees it when the step ends.
glibc serves an allocation that large with a fresh `mmap`, so every step
page-faults on each 4 KiB page of it again: 55,600 faults and ~0.1 s of kernel
time per demo step of ~0.6 s. With glibc's `glibc.malloc.hugetlb=1` tunable
such mappings are advised as transparent huge pages (2 MiB): ~500 faults per
step, and the demo step runs 12-16 % faster (`python -m faceage_jax.bench step
--config configs/demo.py` with and without it). Nothing else changes: same
code, same numbers.

glibc reads tunables only when a process starts, so the entry points call
`reexec_with_huge_pages` first: it starts the same command again, in the same
process, with the tunable added to `GLIBC_TUNABLES`. It does nothing when
`GLIBC_TUNABLES` already names `glibc.malloc.hugetlb` (set it to 0 to opt out),
off glibc >= 2.35, or where the kernel's transparent huge pages are `never`.
Light on purpose (standard library only): it runs before JAX starts.
"""

import logging
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
MIN_GLIBC = (2, 35)  # The first glibc with the tunable.
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


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
    environ: MutableMapping[str, str],
    glibc: tuple[int, ...] | None,
    huge_pages_available: bool,
) -> bool:
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False  # Set already: by our own re-exec, or the user's choice.
    return glibc is not None and glibc >= MIN_GLIBC and huge_pages_available


def reexec_with_huge_pages(
    environ: MutableMapping[str, str] = os.environ,
    argv: Sequence[str] | None = None,
    execve: Callable[[str, Sequence[str], MutableMapping[str, str]], None] = os.execve,
    glibc: tuple[int, ...] | None = None,
    huge_pages_available: bool | None = None,
) -> bool:
    """Restarts this command with `glibc.malloc.hugetlb=1` where that helps; see the module doc.

    Call it before JAX or TensorFlow start threads. `argv` defaults to the
    interpreter's own command line (`sys.orig_argv`, options such as `-m` and
    `-X` included). Returns False when it leaves the process as it is; when it
    restarts it, it does not return. The other arguments are for tests.
    """
    glibc = glibc_version() if glibc is None else glibc
    if huge_pages_available is None:
        huge_pages_available = transparent_huge_pages_available()
    if not wants_reexec(environ, glibc, huge_pages_available):
        return False
    previous = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = f"{previous}:{SETTING}" if previous else SETTING
    logging.getLogger(__name__).info(
        "Restarting with GLIBC_TUNABLES=%s (huge pages for XLA's step buffers).",
        environ["GLIBC_TUNABLES"],
    )
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    execve(sys.executable, list(sys.orig_argv if argv is None else argv), environ)
    return True
