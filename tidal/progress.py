"""Progress bars on a terminal, silence in logs and CI (tqdm turns itself off without a TTY)."""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False,
             unit: str = "it") -> Iterable[T]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # bare GPU boxes may lack tqdm: no bar, same behaviour
        return iterable
    disable = None if not os.environ.get("CI") else True
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True,
                unit=unit)
