"""Shared classification task: which genre (comedy, history, tragedy) a Shakespeare passage is from.

Passages are runs of ``words`` consecutive words cut from each play; the label is the
play's genre (``data.GENRE_OF``). Train passages come from the plays of the ``train`` split,
test passages from the ``evaluation`` split, so no play is in both; the ``calibration``
plays are left to calibration (unlabelled). Selection is deterministic for a seed: every
class gets the same number of passages, taken round-robin over its plays so each play
contributes evenly.

>>> train = genre_passages("train", per_class=128)    # list of Passage(text, label, work)
>>> test = genre_passages("test", per_class=100)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import GENRE_OF, SHAKESPEARE_SPLITS, load_corpus
from ..errors import GeoCompError

GENRE_LABELS = ("comedy", "history", "tragedy")  # label index = position
TASK_SPLITS = {"train": "train", "test": "evaluation"}  # task split → Shakespeare split (disjoint by work)


@dataclass(frozen=True)
class Passage:
    text: str
    label: int  # index into GENRE_LABELS
    work: str


def _chunks(text: str, words: int) -> list[str]:
    tokens = text.split()
    return [" ".join(tokens[i: i + words]) for i in range(0, len(tokens) - words + 1, words)]


def genre_passages(split: str, words: int = 64, per_class: int | None = None, seed: int = 0) -> list[Passage]:
    """Balanced, deterministic passages of one task split (``train`` or ``test``), shuffled."""
    if split not in TASK_SPLITS:
        raise GeoCompError(f"genre task split must be one of {', '.join(TASK_SPLITS)}, got {split!r}.")
    if words < 1:
        raise GeoCompError(f"passage length must be at least 1 word, got {words}.")
    works = SHAKESPEARE_SPLITS[TASK_SPLITS[split]]
    corpus = dict(load_corpus("shakespeare:" + "+".join(works)).documents)
    by_class: dict[int, list[list[Passage]]] = {i: [] for i in range(len(GENRE_LABELS))}
    for work in works:
        label = GENRE_LABELS.index(GENRE_OF[work])
        chunks = _chunks(corpus[work], words)
        random.Random(f"{seed}:{work}").shuffle(chunks)
        by_class[label].append([Passage(c, label, work) for c in chunks])
    available = min(sum(len(w) for w in plays) for plays in by_class.values())
    n = available if per_class is None else per_class
    if n > available:
        raise GeoCompError(f"the {split} split has only {available} passages of {words} words per genre; "
                           f"asked for {per_class}.")
    out: list[Passage] = []
    for plays in by_class.values():
        picked, i = [], 0
        while len(picked) < n:  # round-robin over the genre's plays
            for play in plays:
                if i < len(play) and len(picked) < n:
                    picked.append(play[i])
            i += 1
        out.extend(picked)
    random.Random(seed).shuffle(out)
    return out
