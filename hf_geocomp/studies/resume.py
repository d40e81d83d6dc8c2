"""Continuing an unfinished results file: settings checked before any model is loaded, the baseline after, and
rows written by several processes of the same settings merged into one file."""

from __future__ import annotations

import json
import math
import os

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
        theirs = {"rows": [], "parts": []}
        if os.path.exists(path):
            with open(path) as f:
                theirs = json.load(f)
        merged = {key(r): r for r in theirs["rows"]}
        merged.update({key(r): r for r in rows})
        parts = [p for p in theirs.get("parts", []) if p.get("id") != part["id"]] + [part]
        parts.sort(key=lambda p: p["started"])
        merged_rows = sorted(merged.values(), key=key)
        write_json(path, build(merged_rows, parts))
        return merged_rows
