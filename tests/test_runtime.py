"""Process-wide runtime settings: the huge-page restart, the XLA:CPU scheduler choice."""

import subprocess
import sys

import pytest

from faceage_jax import defaults as default_config
from faceage_jax import runtime
from tests.helpers import start_python

GLIBC = (2, 36)
COMMAND = ["python3", "-m", "faceage_jax.main", "--workdir", "w"]


class FakeExecve:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def __call__(self, path, argv, environ):
        self.calls.append((path, list(argv), dict(environ)))
        if self.error:
            raise self.error


def reexec(environ, glibc=GLIBC, huge_pages_available=True, execve=None):
    execve = execve or FakeExecve()
    restarted = runtime.reexec_with_huge_pages(
        environ,
        argv=COMMAND,
        execve=execve,
        glibc=glibc,
        huge_pages_available=huge_pages_available,
    )
    assert restarted == (bool(execve.calls) and not execve.error)
    return execve.calls


def test_restarts_the_same_command_with_the_tunable_by_this_interpreter():
    environ = {"PATH": "/bin"}
    [(path, argv, env)] = reexec(environ)
    assert path == sys.executable
    assert argv == [sys.executable, *COMMAND[1:]]
    assert env == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        runtime.RESTARTED: "1",
    }
    assert environ == {"PATH": "/bin"}  # The new environment is a copy.


def test_keeps_the_users_other_tunables():
    [(_, _, env)] = reexec({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"},  # Opted out.
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # Set: by the restart or the user.
        {runtime.RESTARTED: "1"},  # Restarted, though the loader dropped the tunable.
        {"JAX_PLATFORMS": "cuda"},  # No XLA:CPU step.
    ],
)
def test_no_restart_when_set_already_or_off_cpu(environ):
    before = dict(environ)
    assert reexec(environ) == []
    assert environ == before


def test_restarts_where_the_cpu_is_one_of_the_platforms():
    assert len(reexec({"JAX_PLATFORMS": "cuda,cpu"})) == 1
    assert len(reexec({}, glibc=(2, 35))) == 1  # The first glibc with the tunable.


@pytest.mark.parametrize(
    "glibc, available", [(None, True), ((2, 34), True), ((2, 36), False), ((3, 0), False)]
)
def test_no_restart_where_it_cannot_help(glibc, available):
    # glibc None: another C library.
    assert not runtime.wants_reexec({}, glibc, available)
    if glibc is not None:
        assert reexec({}, glibc=glibc, huge_pages_available=available) == []


def test_a_failed_restart_goes_on_without_it(capsys):
    environ = {"PATH": "/bin"}
    execve = FakeExecve(error=FileNotFoundError(2, "No such file"))
    assert len(reexec(environ, execve=execve)) == 1
    assert environ == {"PATH": "/bin"}
    assert "going on without it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, available",
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ],
)
def test_reads_the_kernels_huge_page_mode(tmp_path, content, available):
    path = tmp_path / "enabled"
    path.write_text(content)
    assert runtime.transparent_huge_pages_available(str(path)) is available
    assert not runtime.transparent_huge_pages_available(str(tmp_path / "missing"))


def test_a_real_restart_runs_the_command_again_in_the_same_process():
    unset = {"GLIBC_TUNABLES": None, runtime.RESTARTED: None, "JAX_PLATFORMS": None}
    if not runtime.wants_reexec(
        {}, runtime.glibc_version(), runtime.transparent_huge_pages_available()
    ):
        pytest.skip("no glibc >= 2.35 with transparent huge pages here: nothing to restart")
    script = (
        "import os\n"
        "from faceage_jax import runtime\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
        "runtime.reexec_with_huge_pages()\n"
        "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
    )
    run = start_python("-c", script, env=unset, stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    # The first run's line survives the restart (flushed), the second run does
    # not restart again, and both are the process that was started.
    assert stdout.splitlines() == [
        f"start {run.pid} None",
        f"start {run.pid} glibc.malloc.hugetlb=1",
        f"after {run.pid} glibc.malloc.hugetlb=1",
    ]
    assert "Restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in stderr


# --- XLA:CPU's scheduler --------------------------------------------------------------------


def scheduler_config(batch_size, image_size, num_processes=-1):
    config = default_config.get_config()
    config.batch_size, config.image_size, config.num_processes = (
        batch_size,
        image_size,
        num_processes,
    )
    return config


def test_large_steps_get_the_memory_minimizing_cpu_scheduler():
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert runtime.choose_xla_cpu_scheduler(scheduler_config(4, 128), environ)
    assert environ["XLA_FLAGS"] == (
        "--xla_dump_to=/tmp/x --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )


@pytest.mark.parametrize(
    "batch_size, image_size, num_processes", [(1, 128, -1), (4, 64, -1), (8, 128, 4)]
)
def test_small_steps_keep_the_default_cpu_scheduler(batch_size, image_size, num_processes):
    environ = {}
    config = scheduler_config(batch_size, image_size, num_processes)
    assert not runtime.choose_xla_cpu_scheduler(config, environ)
    assert environ == {}


def test_the_users_cpu_scheduler_choice_is_kept():
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    environ = {"XLA_FLAGS": flag}
    assert not runtime.choose_xla_cpu_scheduler(scheduler_config(16, 256), environ)
    assert environ["XLA_FLAGS"] == flag
