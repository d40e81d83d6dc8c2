"""Building the fused kernel (kv.kernel_build): a dead or hung builder never blocks a later process beyond a bound.

The builders here are real processes running the real build path; their compiler is a script that hangs (put first
on their PATH, so the build folder is the same as the later process's), and the later process runs with a time limit
so that a wait without end fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hf_geocomp.kv import kernel_build

ROOT = Path(__file__).resolve().parents[1]
# The smallest module torch's build can make: no torch headers, so it compiles in about a second.
TINY = textwrap.dedent("""\
    #include <Python.h>
    #define INIT_(name) PyInit_##name
    #define INIT(name) INIT_(name)
    static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
    PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tiny); }
    """)
LOAD_TINY = "import sys; from hf_geocomp.kv import kernel_build as kb; from pathlib import Path; " \
            "print(kb.load('tiny', Path(sys.argv[1]), [], [], 'a test extension').__name__)"


def _env(tmp_path: Path, hung: bool = False, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_GEOCOMP_KERNEL_DIR": str(tmp_path / "kernels"), **extra}
    if hung:  # a compiler that never finishes (torch asks it its version inside its own lock, then builds with it)
        bin_ = tmp_path / "hung-bin"
        bin_.mkdir(exist_ok=True)
        for name in ("c++", "g++"):
            (bin_ / name).write_text("#!/bin/sh\nexec sleep 600\n")
            (bin_ / name).chmod(0o755)
        env["PATH"] = f"{bin_}{os.pathsep}{env['PATH']}"
    return env


def _start_builder(tmp_path: Path, code: str, *args: str) -> subprocess.Popen:
    """A process in its own session that builds with the hung compiler; returns once torch's lock file exists."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=_env(tmp_path, hung=True),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "kernels").glob("*/lock")):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the builder never started building (exit status {child.poll()})")
        time.sleep(0.2)
    return child


def _run(tmp_path: Path, code: str, *args: str, timeout: float, **env) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-W", "always", "-c", code, *args], env=_env(tmp_path, **env),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a later build was blocked for more than {timeout} s")


def test_a_builder_killed_mid_build_does_not_block_the_next(tmp_path):
    """The killed builder leaves torch's lock file; the next process removes it with a warning naming it, builds
    (saying so on one line first) and loads; a third process finds the build cached and prints nothing."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    child = _start_builder(tmp_path, LOAD_TINY, str(source))
    os.killpg(child.pid, signal.SIGKILL)  # the builder and its compiler
    child.wait()
    (left,) = (tmp_path / "kernels").glob("*/lock")

    done = _run(tmp_path, LOAD_TINY, str(source), timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tiny"  # the module the build made
    assert f"removing the build lock {left}" in done.stderr
    assert sum("building a test extension on first use" in line for line in done.stderr.splitlines()) == 1
    assert not left.exists()

    again = _run(tmp_path, LOAD_TINY, str(source), timeout=180)
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr
    assert "hf_geocomp:" not in again.stderr  # cached: no build line, no lock warning


def test_a_hung_builder_is_waited_for_at_most_the_bound(tmp_path):
    """A live builder that never finishes holds the lock; the fused kernel's next user waits the bound (saying so,
    naming the lock file), then warns naming the file and runs the PyTorch path."""
    code = "from hf_geocomp.kv import fused; print(fused.kernel())"
    child = _start_builder(tmp_path, code)
    try:
        started = time.monotonic()
        done = _run(tmp_path, code, timeout=120, HF_GEOCOMP_KERNEL_WAIT="3")
        took = time.monotonic() - started
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    (lock,) = (tmp_path / "kernels").glob(f"*/{kernel_build.LOCK}")
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert f"waiting up to 3 s for another process building the fused decode kernel of hf_geocomp.kv (lock {lock})" \
        in done.stderr
    assert f"has held the build lock {lock} for more than 3 s" in done.stderr
    assert "PyTorch instead" in done.stderr and "ninja" not in done.stderr  # no compiler advice for a hung builder
    assert took >= 3


def test_build_folder_follows_everything_the_build_reads(tmp_path, monkeypatch):
    """One folder per (source, flags, compiler, torch include/library paths, Python): two environments that differ
    only in their include paths get two folders, so neither rebuilds the other's build."""
    from torch.utils import cpp_extension as ext

    monkeypatch.setenv("HF_GEOCOMP_KERNEL_DIR", str(tmp_path))
    name, build = kernel_build.location("k", b"int f();", ["-O3"], [])
    assert build.parent == tmp_path and build.name == name and name.isidentifier()
    assert kernel_build.location("k", b"int f();", ["-O3"], []) == (name, build)
    assert kernel_build.location("k", b"int g();", ["-O3"], [])[0] != name
    assert kernel_build.location("k", b"int f();", ["-O2"], [])[0] != name
    assert kernel_build.location("k", b"int f();", ["-O3"], ["-fopenmp"])[0] != name
    include = ext.include_paths
    monkeypatch.setattr(ext, "include_paths", lambda *a, **k: ["/other/venv/include", *include(*a, **k)[1:]])
    assert kernel_build.location("k", b"int f();", ["-O3"], [])[0] != name
    monkeypatch.undo()
    monkeypatch.setenv("HF_GEOCOMP_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "clang++")
    assert kernel_build.location("k", b"int f();", ["-O3"], [])[0] != name
