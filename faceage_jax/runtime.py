"""Process-wide runtime settings, set by the entry points (`main`, `bench`) only.

- `reexec_with_huge_pages`: transparent huge pages for the step's working memory.
- `choose_xla_cpu_scheduler`: XLA:CPU's operation scheduler for the config's step.
- `enable_compilation_cache`: the persistent XLA cache, so a restart skips compiling.
- `release_freed_memory`: the compiler's freed memory back to the OS.
- `cpu_info`: the host CPU's model and the instruction sets that set its speed.

Huge pages. XLA:CPU allocates each execution's temporary buffer with `malloc`
and frees it when the step ends. glibc serves an allocation that large with a
fresh `mmap`, so every step page-faults on each 4 KiB page of it again. With
glibc's `glibc.malloc.hugetlb=1` tunable such mappings are advised as
transparent huge pages (2 MiB): a few hundred faults per step instead of tens of
thousands, and a faster step on CPU (README, "Benchmarks"). The computation is
the same; only the memory under it changes.

glibc reads tunables only when a process starts, so the entry points call
`reexec_with_huge_pages` before anything else (before flags, files or other
processes are touched): it restarts the same command, in the same process (same
PID), with the tunable added to `GLIBC_TUNABLES`. Child processes inherit it.
It restarts at most once, and not at all when `GLIBC_TUNABLES` already names
`glibc.malloc.hugetlb` (`glibc.malloc.hugetlb=0` opts out, e.g. under a
debugger), with another C library or a glibc older than 2.35, where the kernel's
transparent huge pages are `never`, or when `JAX_PLATFORMS` leaves out the CPU.
That part uses the standard library only: it runs before flags are parsed and
before JAX starts a backend.
"""

import ctypes
import dataclasses
import logging as std_logging
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections

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
    say(f"Restarting with GLIBC_TUNABLES={SETTING} (see faceage_jax/runtime.py).")
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


# Per-process images x pixels from which XLA:CPU's memory-minimizing scheduler is used.
LARGE_STEP_PIXELS = 4 * 128 * 128
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def choose_xla_cpu_scheduler(config: ml_collections.ConfigDict, environ=os.environ) -> bool:
    """Picks XLA:CPU's operation scheduler for `config`'s step; True if it set one.

    XLA:CPU's default scheduler runs independent operations side by side: that
    keeps the cores busy when operations are small (batch 1 at 128x128) but keeps
    more buffers alive. From 4 images of 128x128 per process single operations
    fill the cores, and the memory-minimizing scheduler is as fast and needs less
    memory (README, "Benchmarks"). Adds the flag to `XLA_FLAGS` unless the user
    set it; XLA reads it when JAX starts its CPU backend, so call this before
    anything touches a device. No effect on GPUs/TPUs.
    """
    if SCHEDULER_FLAG in environ.get("XLA_FLAGS", ""):
        return False
    processes = max(config.num_processes, 1)
    if config.batch_size // processes * config.image_size**2 < LARGE_STEP_PIXELS:
        return False
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {SCHEDULER_FLAG}=false".strip()
    return True


def enable_compilation_cache(directory: str) -> None:
    """Persistent XLA cache in `directory`, so that a restarted run does not compile again.

    Unless one is set already (for example by JAX_COMPILATION_CACHE_DIR, to share
    it between runs).
    """
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def release_freed_memory() -> None:
    """Returns memory the allocator holds but no longer uses (the XLA compiler's) to the OS.

    After compiling the training step glibc keeps the compiler's freed memory
    mapped; trimming it lowers the training process's peak memory by as much. A
    no-op where glibc is not the C library.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


class LibraryInfoFilter(std_logging.Filter):
    """Keeps the console readable: other libraries' INFO lines are dropped, warnings kept."""

    OWN = ("faceage_jax", "input_pipeline", "clu")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or any(
            f"{os.sep}{name}{os.sep}" in record.pathname for name in self.OWN
        )


def run_app(main: Callable, define_flags: Callable[[], None]) -> None:
    """absl's `app.run(main)` after `define_flags()`, other libraries' INFO lines dropped."""
    from absl import app, logging

    define_flags()
    logging.get_absl_handler().addFilter(LibraryInfoFilter())
    app.run(main)


# The x86 ISA extensions that decide how fast a CPU step can be: AVX-512 for
# float32, AVX-512 BF16 and AMX for bfloat16 matrix products (/proc/cpuinfo names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The host CPU as `lscpu` names it, and which of `ISA_FLAGS` it has."""

    model: str
    cores: int
    flags: frozenset[str]

    def describe(self) -> str:
        have = [flag for flag in ISA_FLAGS if flag in self.flags]
        lack = [flag for flag in ISA_FLAGS if flag not in self.flags]
        return f"{self.model} ({self.cores} cores); ISA: {' '.join(have) or '(none of them)'}" + (
            f"; lacks {' '.join(lack)}" if lack else ""
        )


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """Reads /proc/cpuinfo (or the text given); elsewhere falls back to `platform`."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    return CpuInfo(model, os.cpu_count() or 1, frozenset(fields.get("flags", "").split()))
