"""Output folders that appear whole or not at all, and results JSON."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GeoCompError


def check_output(path: str | Path, overwrite: bool = False) -> None:
    """Raise unless ``path`` may be written: absent, an empty folder, or ``overwrite`` given."""
    target = Path(path)
    if overwrite or not target.exists():
        return
    if target.is_dir():
        if any(target.iterdir()):
            raise GeoCompError(f"output folder {str(path)!r} already exists and is not empty; pass --overwrite.")
    else:
        raise GeoCompError(f"output file {str(path)!r} already exists; pass --overwrite to replace it.")


@contextlib.contextmanager
def output_dir(path: str, overwrite: bool = False):
    """Yield a temporary folder beside ``path`` that is renamed to ``path`` only on success.

    An existing non-empty ``path`` is an error unless ``overwrite``; on any failure the
    temporary folder is removed, so no half-written output is ever left behind.
    """
    target = Path(path)
    check_output(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(path: str | Path):
    """Hold an exclusive lock on the folder of ``path`` (created if missing) while the block runs: processes that
    read, merge and rewrite one results file take turns. No lock file is left behind."""
    import fcntl

    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def resolved_args(options) -> dict:
    """The resolved options of a command (its options dataclass: defaults, recipe and overrides applied) and the
    subcommand's name, for results files."""
    import dataclasses

    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.init}
    return dict(sorted({"command": options.command, **values}.items()))
