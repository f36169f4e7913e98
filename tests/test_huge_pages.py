"""Restarting the entry points with glibc's huge-page tunable (`faceage_jax.huge_pages`)."""

import os
import pathlib
import subprocess
import sys

import pytest

from faceage_jax import huge_pages

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
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
    restarted = huge_pages.reexec_with_huge_pages(
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
        huge_pages.RESTARTED: "1",
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
        {huge_pages.RESTARTED: "1"},  # Restarted, though the loader dropped the tunable.
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
    assert not huge_pages.wants_reexec({}, glibc, available)
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
    assert huge_pages.transparent_huge_pages_available(str(path)) is available
    assert not huge_pages.transparent_huge_pages_available(str(tmp_path / "missing"))


def test_a_real_restart_runs_the_command_again_in_the_same_process():
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("GLIBC_TUNABLES", huge_pages.RESTARTED, "JAX_PLATFORMS")
    }
    if not huge_pages.wants_reexec(
        environ, huge_pages.glibc_version(), huge_pages.transparent_huge_pages_available()
    ):
        pytest.skip("no glibc >= 2.35 with transparent huge pages here: nothing to restart")
    script = (
        "import os\n"
        "from faceage_jax import huge_pages\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
        "huge_pages.reexec_with_huge_pages()\n"
        "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
