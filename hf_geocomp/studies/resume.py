"""Continuing an unfinished results file: settings checked before any model is loaded, the baseline after, and
rows written by several processes of the same settings merged into one file.

Processes sharing a file take their work from it: each claims the next row that is neither in the file nor
claimed by a live process (:func:`claim_next`), so the same command started twice splits the work between the two,
and a process stopped midway leaves only its unfinished row, which the next claim takes over.
"""

from __future__ import annotations

import json
import math
import os
import socket

from ..errors import GeoCompError
from ..io import folder_lock, write_json


def previous_run(path: str, settings: dict, grows: tuple[str, ...] = ("seeds",)) -> dict | None:
    """The results file at ``path`` to continue (None: nothing there yet), refused unless it was written with the
    same ``settings`` (keys in ``grows``, e.g. the number of seeds, may differ: a run may add seeds)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        previous = json.load(f)
    where = f"cannot resume {path}"
    if "settings" not in previous:
        raise GeoCompError(f"{where}: it records no settings to check against; rerun with --overwrite.")
    differ = [k for k in settings if k not in grows and previous["settings"].get(k) != settings[k]]
    if differ:
        raise GeoCompError(f"{where}: its {differ[0]!r} is {previous['settings'].get(differ[0])!r}, this run's "
                           f"{settings[differ[0]]!r}; rerun with the same settings or with --overwrite.")
    return previous


def check_same_baseline(path: str, previous: dict | None, ppl: float) -> None:
    """The same model and text must give the same baseline perplexity, or the resumed rows do not pair with new
    ones (1e-6 relative: the last digits move between library versions)."""
    if previous is not None and not math.isclose(previous["baseline"]["ppl"], ppl, rel_tol=1e-6):
        raise GeoCompError(f"cannot resume {path}: its baseline perplexity {previous['baseline']['ppl']:.6g} is "
                           f"not this run's {ppl:.6g} (another model or library version).")


def save_shared(path: str, rows: list[dict], part: dict, key, build) -> list[dict]:
    """Write ``build(rows, parts)`` to ``path`` with this process's ``rows`` merged into the rows other processes of
    the same settings have written there meanwhile (one row per ``key(row)``; this process's win), and its ``part``
    (identified by ``part["id"]``) beside theirs. Returns the merged rows. Holds the folder's lock while it reads and
    writes, so processes sharing the file never lose each other's rows."""
    with folder_lock(path):
        theirs = _read(path)
        merged = {key(r): r for r in theirs["rows"]}
        merged.update({key(r): r for r in rows})
        parts = [p for p in theirs.get("parts", []) if p.get("id") != part["id"]] + [part]
        parts.sort(key=lambda p: p["started"])
        merged_rows = sorted(merged.values(), key=key)
        _write(path, build(merged_rows, parts), [c for c in theirs.get("claims", []) if tuple(c["key"]) not in merged])
        return merged_rows


def claim_next(path: str, todo: list[tuple], key, build) -> tuple | None:
    """The first of ``todo`` (row keys, in the order to run them) that the file at ``path`` has no row for and no
    live process has claimed, now claimed for this process in the file; None when nothing is left to take.
    ``build(rows, parts)`` makes the file when there is none yet. A claim is live while its process runs on this
    host (claims of other hosts are always honoured); rows written by :func:`save_shared` release theirs."""
    with folder_lock(path):
        current = _read(path) if os.path.exists(path) else build([], [])
        claims = [c for c in current.get("claims", []) if _alive(c)]
        taken = {key(r) for r in current["rows"]} | {tuple(c["key"]) for c in claims}
        nxt = next((k for k in todo if k not in taken), None)
        if nxt is not None:
            claims.append({"key": list(nxt), "host": socket.gethostname(), "pid": os.getpid()})
        _write(path, current, claims)
        return nxt


def _alive(claim: dict) -> bool:
    if claim["host"] != socket.gethostname():
        return True
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {"rows": [], "parts": []}
    with open(path) as f:
        return json.load(f)


def _write(path: str, result: dict, claims: list[dict]) -> None:
    """``result`` with ``claims`` (rows being run by some process), left out when there are none."""
    result = {k: v for k, v in result.items() if k != "claims"}
    write_json(path, {**result, "claims": claims} if claims else result)
