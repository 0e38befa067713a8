"""The one progress bar of a start that compiles: the count of programs and an estimate of the
time left, on stderr, shown only once compiling takes more than a second (a warm start that
loads its programs from the cache prints just its ready line)."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def compile_progress(items: Iterable[T], desc: str, show: bool = True) -> Iterator[T]:
    """``items``, with a progress bar over them when ``show``."""
    if not show:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, unit="program", file=sys.stderr, delay=1.0))
