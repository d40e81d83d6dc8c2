"""Build a C++ torch extension once per machine and environment, so that no process ever waits on a dead one.

``torch.utils.cpp_extension.load`` builds under a lock file of its own (``lock`` in the build folder,
a ``FileBaton``) and a later process polls for that file to go away without end: a builder killed
mid-build leaves it behind and every later process sits at 0% CPU forever. Here, around torch's
build and load:

* processes take turns with ``fcntl.flock`` on ``build.lock`` in the build folder, a lock the operating
  system releases when its holder dies; holding it, a torch ``lock`` file can only be the leftover of a
  dead builder, and is removed with a warning naming it;
* a process waits for a live builder (a hung compiler) at most ``wait`` seconds, then raises
  :class:`BuildLockTimeout` naming the lock file (the caller falls back and says so);
* the build folder is named after everything that goes into torch's build files: the source, flags,
  compiler, torch's version, include and library paths, Python's version and extension ABI, and the CPU
  (``-march=native``), so two virtual environments never rebuild each other's build, and the source is
  copied into the folder (the build reads the copy, so every checkout of one source shares one build);
* one line on stderr says a build is starting (it takes about a minute), none when the build is cached.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

WAIT_SECONDS = 300.0  # a build takes about a minute, several on a loaded machine; longer means a hung builder
LOCK = "build.lock"  # ours (flock); torch's own is "lock"


class BuildLockTimeout(RuntimeError):
    """Another live process held the build lock longer than the wait allowed."""


def _cpu() -> str:
    """What ``-march=native`` reads: the machine and its CPU feature flags (Linux), else the machine only."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + " " + " ".join(sorted(flags.partition(":")[2].split()))


def location(prefix: str, source: bytes, cflags: list[str], ldflags: list[str]) -> tuple[str, Path]:
    """(extension name, build folder), both ``<prefix>_<digest>`` of the source and of everything torch's build
    files read besides it. The folder is under ``HF_GEOCOMP_KERNEL_DIR`` (default ``~/.cache/hf_geocomp/kernels``)."""
    import torch
    from torch.utils import cpp_extension as ext

    inputs = [*cflags, "|", *ldflags, "|", ext.get_cxx_compiler(), torch.__version__, *ext.include_paths("cpu"),
              *ext.library_paths("cpu"), str(sysconfig.get_path("include", scheme="posix_prefix")), sys.version,
              str(sysconfig.get_config_var("EXT_SUFFIX")), _cpu()]
    digest = hashlib.sha256(source + "\0".join(inputs).encode()).hexdigest()[:12]
    root = Path(os.environ.get("HF_GEOCOMP_KERNEL_DIR") or Path.home() / ".cache" / "hf_geocomp" / "kernels")
    name = f"{prefix}_{digest}"
    return name, root / name


@contextmanager
def turn(lock: Path, wait: float, what: str):
    """Hold an exclusive ``flock`` on ``lock`` (created if missing) within the block; wait for it at most ``wait``
    seconds (one line on stderr when waiting starts), else raise :class:`BuildLockTimeout` naming the file."""
    import fcntl

    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None:
                    deadline = time.monotonic() + wait
                    print(f"hf_geocomp: waiting up to {wait:.0f} s for another process building {what} (lock {lock})",
                          file=sys.stderr, flush=True)
                elif time.monotonic() >= deadline:
                    raise BuildLockTimeout(f"another process has held the build lock {lock} for more than {wait:.0f} s "
                                           f"(a hung build? stop that process, or remove {lock.parent})") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def load(prefix: str, source: Path, cflags: list[str], ldflags: list[str], what: str, wait: float | None = None):
    """Build (once) and import the extension made of the single C++ file ``source``; ``what`` names it in messages.

    ``wait`` (default ``HF_GEOCOMP_KERNEL_WAIT`` or :data:`WAIT_SECONDS`): the longest wait for another process
    that is building the same extension. Errors of the build itself come from torch unchanged."""
    from torch.utils import cpp_extension as ext

    if wait is None:
        wait = float(os.environ.get("HF_GEOCOMP_KERNEL_WAIT") or WAIT_SECONDS)
    code = source.read_bytes()
    name, build = location(prefix, code, cflags, ldflags)
    build.mkdir(parents=True, exist_ok=True)
    with turn(build / LOCK, wait, what):
        left = build / "lock"  # torch's FileBaton: only a dead builder leaves it while we hold the flock
        stale = left.exists()
        if stale:
            warnings.warn(f"hf_geocomp: removing the build lock {left}, left by a build of {what} that was stopped; "
                          f"building again.", RuntimeWarning, stacklevel=3)
            left.unlink(missing_ok=True)
        copy = build / f"{prefix}{source.suffix}"
        if not copy.exists() or copy.read_bytes() != code:
            copy.write_bytes(code)
        if stale or not (build / f"{name}{ext.LIB_EXT}").exists():
            print(f"hf_geocomp: building {what} on first use (about a minute; cached in {build})", file=sys.stderr,
                  flush=True)
        return ext.load(name=name, sources=[str(copy)], build_directory=str(build), extra_cflags=cflags,
                        extra_ldflags=ldflags, verbose=False)
