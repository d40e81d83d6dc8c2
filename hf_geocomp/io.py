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
    """Raise unless ``path`` may be written: absent, an empty folder, or ``overwrite`` given; and its parent
    folder can be created and written (checked before any work, so a run never ends on an unwritable output)."""
    if not str(path).strip():
        raise GeoCompError("the output path is empty; give a folder or file name.")
    target = Path(path)
    if target.exists() and not overwrite:
        if not target.is_dir():
            raise GeoCompError(f"output file {str(path)!r} already exists; pass --overwrite to replace it.")
        if any(target.iterdir()):
            raise GeoCompError(f"output folder {str(path)!r} already exists and is not empty; pass --overwrite.")
    check_writable_parent(target)


def check_writable_parent(target: Path) -> None:
    """Raise unless the folder that will hold ``target`` exists or can be created, and a file can be written there.

    Nothing is created: the nearest existing ancestor must be a folder in which a probe folder can be made.
    """
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise GeoCompError(f"cannot write {str(target)!r}: {str(ancestor)!r} is a file, not a folder.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hf_geocomp_probe.", dir=ancestor))
    except OSError as e:
        raise GeoCompError(f"cannot write {str(target)!r}: the folder {str(ancestor)!r} is not writable "
                           f"({e.strerror or e}).") from None


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
        replace_aside(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_aside(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is first renamed aside (a hidden ``.<name>.old-*``
    sibling) and removed only once ``new`` is in place, so at every moment one of them is whole on disk. If the
    final rename fails, the old one is put back."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        os.rmdir(aside.parent)
        raise
    shutil.rmtree(aside.parent, ignore_errors=True)


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
