"""Restarting the entry points with glibc's huge-page tunable (`faceage_jax.huge_pages`)."""

import os
import pathlib
import subprocess
import sys

import pytest

from faceage_jax import huge_pages

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GLIBC = (2, 36)


class FakeExecve:
    def __init__(self):
        self.calls = []

    def __call__(self, path, argv, environ):
        self.calls.append((path, list(argv), dict(environ)))


def reexec(environ, glibc=GLIBC, huge_pages_available=True):
    execve = FakeExecve()
    restarted = huge_pages.reexec_with_huge_pages(
        environ,
        argv=["python", "-m", "faceage_jax.main", "--workdir", "w"],
        execve=execve,
        glibc=glibc,
        huge_pages_available=huge_pages_available,
    )
    assert restarted == bool(execve.calls)
    return execve.calls


def test_restarts_the_same_command_with_the_tunable():
    environ = {"PATH": "/bin"}
    [(path, argv, env)] = reexec(environ)
    assert path == sys.executable
    assert argv == ["python", "-m", "faceage_jax.main", "--workdir", "w"]
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_keeps_the_users_other_tunables():
    [(_, _, env)] = reexec({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("setting", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1"])
def test_a_set_tunable_is_left_alone(setting):
    # =0 is the user's opt-out; =1 is what the restarted process sees: no loop.
    environ = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{setting}"}
    assert reexec(environ) == []
    assert environ == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{setting}"}


@pytest.mark.parametrize(
    "glibc, available", [(None, True), ((2, 34), True), ((2, 36), False), ((3, 0), False)]
)
def test_no_restart_where_it_cannot_help(glibc, available):
    # glibc None: another C library.
    assert not huge_pages.wants_reexec({}, glibc, available)
    if glibc is not None:
        environ = {}
        assert reexec(environ, glibc=glibc, huge_pages_available=available) == []
        assert environ == {}


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


def test_a_real_restart_runs_the_command_once_more_with_the_tunable():
    if not huge_pages.wants_reexec(
        {}, huge_pages.glibc_version(), huge_pages.transparent_huge_pages_available()
    ):
        pytest.skip("no glibc >= 2.35 with transparent huge pages here: nothing to restart")
    script = (
        "import os, sys\n"
        "from faceage_jax import huge_pages\n"
        "seen = os.environ.get('GLIBC_TUNABLES')\n"
        "huge_pages.reexec_with_huge_pages()\n"
        "print(os.getpid(), seen)\n"
    )
    environ = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # One line: the first run restarted before printing; the second saw the tunable.
    [line] = result.stdout.splitlines()
    assert line.split()[1] == "glibc.malloc.hugetlb=1"
