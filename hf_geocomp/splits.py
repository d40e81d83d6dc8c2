"""Held-out splits by content: near-identical documents are kept on one side.

Python's documentation topics repeat each other (the topic ``else`` is byte-identical to a part of
``if``; ``customization`` is 98% inside ``specialnames``) and the standard library holds families of
generated files (``encodings/cp*.py``). A split by name puts members of one family on both sides,
so evaluation text was read in calibration. Here documents are first grouped into *families* —
two documents are in one family when they share any 200-character passage (transitively) — and
whole families are assigned to a side.

Passages are sampled at content-defined positions: the 200 characters after every line start.
A passage copied from one document into another carries its line starts along, so copies are
found wherever they sit, without hashing every offset. :func:`shared_fraction` measures the
result independently (:func:`pieces`, 50-character pieces at line starts, a bound from above on the share of a
document's 200-character windows that occur verbatim elsewhere).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

PASSAGE = 200  # characters of a shared passage that ties two documents into one family


def _line_starts(text: str) -> list[int]:
    starts, pos = [], 0
    for line in text.split("\n"):
        starts.append(pos)
        pos += len(line) + 1
    return starts


def passages(text: str, width: int = PASSAGE) -> set[str]:
    """The ``width``-character passages of ``text`` that start at a line start."""
    return {text[s: s + width] for s in _line_starts(text) if s + width <= len(text)}


def families(texts: Sequence[str], width: int = PASSAGE) -> list[list[int]]:
    """Indices of ``texts`` grouped into families: documents sharing a passage, transitively.

    Families are returned in order of their first member; members in increasing order.
    """
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_owner: dict[str, int] = {}
    for i, text in enumerate(texts):
        for p in passages(text, width):
            j = first_owner.setdefault(p, i)
            if j != i:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(texts)):
        groups[root(i)].append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def held_out(groups: list[list[int]], every: int) -> tuple[list[int], list[int]]:
    """``(kept, held)`` indices: every ``every``-th single-document family is held out.

    Families of several near-identical documents always stay on the kept side, so a held-out
    document has no near-copy anywhere, and no one family (104 ``encodings`` files) can
    dominate the held-out text.
    """
    singles = [g[0] for g in groups if len(g) == 1]
    held = set(singles[::every])
    kept = sorted(i for g in groups for i in g if i not in held)
    return kept, sorted(held)


def pieces(texts: Sequence[str], piece: int = 50) -> set[str]:
    """The ``piece``-character pieces of ``texts`` that start at a line start: the index :func:`shared_fraction` reads."""
    return {t[s: s + piece] for t in texts for s in _line_starts(t) if s + piece <= len(t)}


def shared_fraction(text: str, index: set[str], step: int = 1, piece: int = 50, window: int = PASSAGE) -> float:
    """Fraction of ``text``'s ``window``-character windows (every ``step``-th offset) that may occur in the texts
    whose :func:`pieces` are ``index`` (built once, read for every document checked against them).

    A window that occurs verbatim in another text carries every line start inside it along, so
    each ``piece``-character piece starting at such a line start occurs there too. A window is
    counted when all of its pieces are found in ``index`` (and when it holds no line start early
    enough to check): an upper bound on the verbatim share, computed without indexing every offset
    of the other texts.
    """
    starts = [s for s in _line_starts(text) if s + piece <= len(text)]
    total = found = 0
    j = 0
    for i in range(0, len(text) - window + 1, step):
        while j < len(starts) and starts[j] < i + 1:  # line starts strictly inside the window
            j += 1
        inside, k = [], j
        while k < len(starts) and starts[k] + piece <= i + window:
            inside.append(starts[k])
            k += 1
        total += 1
        found += all(text[s: s + piece] in index for s in inside)  # none inside: counted as shared
    return found / total if total else 0.0
