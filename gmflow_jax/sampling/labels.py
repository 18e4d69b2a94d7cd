"""Class names → label ids: ``Sampler.label_ids(["macaw", "golden retriever"])`` → ``[88, 207]``.

A model's classes are named by its config: ImageNet runs (``data.dataset`` 'imagenet…', 1000 classes; the
converted published models too) by the 1000 ImageNet-1k names shipped in ``imagenet_classes.txt``, line
``i`` = class ``i`` in the ADM / DiT ``id2label`` order (the synset order of ``ILSVRC2012``), each line a
comma-separated list of synonyms (``tench, Tinca tinca``); the digits (``data.dataset`` 'digits') by
``0, zero`` … ``9, nine``.

A name matches case- and whitespace-insensitively, as a whole line or as any one of its synonyms. A few
synonyms name two classes (``cardigan``: 264 the corgi, 474 the sweater): the class whose whole line it is
wins, then the class whose first synonym it is; where that does not decide (``crane``: 134 the bird, 517 the
machine; ``grass snake``: 55 and 57), the name is refused with the candidates (pass their integer ids).
Unknown names are refused in one line suggesting the nearest known name.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
from collections.abc import Iterable
from typing import Any

import numpy as np

IMAGENET_FILE = "imagenet_classes.txt"
NUM_IMAGENET = 1000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def normalize(name: str) -> str:
    """Lower case, single spaces, no space before a comma: the form names are compared in."""
    return ", ".join(" ".join(part.casefold().split()) for part in name.split(","))


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class lines (``'tench, Tinca tinca'``, …), index = label id."""
    text = importlib.resources.files(__package__).joinpath(IMAGENET_FILE).read_text(encoding="utf-8")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(lines) != NUM_IMAGENET:
        raise ValueError(f"{IMAGENET_FILE} has {len(lines)} class lines; expected {NUM_IMAGENET}.")
    return lines


def class_names(config: Any) -> tuple[str, ...] | None:
    """The class lines of the model of ``config`` (a run's ConfigDict), or None where its classes have no names."""
    num_classes = int(config.model.get("num_classes", 0) or 0)
    dataset = str(config.get("data", {}).get("dataset", "") or "")
    if dataset.startswith("digits") and num_classes == len(DIGIT_WORDS):
        return tuple(f"{i}, {word}" for i, word in enumerate(DIGIT_WORDS))
    if dataset.startswith("imagenet") and num_classes == NUM_IMAGENET:
        return imagenet_classes()
    return None


class ClassIndex:
    """Name → id lookup over class lines (index = label id)."""

    def __init__(self, lines: Iterable[str]):
        self.lines = tuple(lines)
        self._ids: dict[str, list[int]] = {}  # normalised name -> classes it names
        self._ranked: list[dict[str, set[int]]] = [{}, {}]  # name -> classes whose whole line / first synonym it is
        self._shown: dict[str, str] = {}  # normalised name -> as written in the line
        for i, line in enumerate(self.lines):
            synonyms = [s.strip() for s in line.split(",") if s.strip()]
            for j, name in enumerate([line, *synonyms]):
                key = normalize(name)
                self._shown.setdefault(key, name)
                if i not in self._ids.setdefault(key, []):
                    self._ids[key].append(i)
                if j <= 1:
                    self._ranked[j].setdefault(key, set()).add(i)

    def lookup(self, name: str) -> int:
        """The class id of ``name``; ValueError (one line) for an unknown or ambiguous name."""
        key = normalize(name)
        ids = self._ids.get(key)
        if ids is None:
            nearest = difflib.get_close_matches(key, self._shown, n=1, cutoff=0.0)
            hint = f"; did you mean {self._shown[nearest[0]]!r}?" if nearest else "."
            raise ValueError(f"unknown class name {name!r}{hint}")
        if len(ids) == 1:
            return ids[0]
        for ranked in self._ranked:  # the class whose whole line it is, else whose first synonym it is
            best = ranked.get(key, set())
            if len(best) == 1:
                return next(iter(best))
            if best:
                break
        options = ", ".join(f"{i} ({self.lines[i]!r})" for i in ids)
        raise ValueError(f"class name {name!r} names classes {options}: pass the integer id instead.")

    def ids(self, names: str | int | Iterable[str | int]) -> list[int]:
        """Label ids of ``names`` (a name, or a list of names and/or integer ids, kept as they are)."""
        if isinstance(names, str | int | np.integer):
            names = [names]
        out = []
        for name in names:
            if isinstance(name, int | np.integer) and not isinstance(name, bool):
                if not 0 <= name < len(self.lines):
                    raise ValueError(f"label id {name} is outside [0, {len(self.lines)}).")
                out.append(int(name))
            elif isinstance(name, str):
                out.append(self.lookup(name))
            else:
                raise ValueError(f"class names must be strings (or integer ids); got {name!r}.")
        return out


@functools.cache
def _index(lines: tuple[str, ...]) -> ClassIndex:
    return ClassIndex(lines)


def class_index(config: Any) -> ClassIndex:
    """The ``ClassIndex`` of the model of ``config``; ValueError (one line) where its classes have no names."""
    lines = class_names(config)
    if lines is None:
        num_classes = int(config.model.get("num_classes", 0) or 0)
        dataset = config.get("data", {}).get("dataset", "")
        raise ValueError(
            f"this model's classes have no names (data.dataset={dataset!r}, model.num_classes={num_classes}): "
            "names are known for ImageNet (1000 classes) and the digits; pass integer labels."
        )
    return _index(lines)
