"""Block selections, as Lora.layers and Freeze write them: "0-3,7", "first:2", "last:4", parsed before any model is
at hand and resolved against one."""

from __future__ import annotations

import re
from typing import Any

from ..core.errors import SpecError


def parse_blocks(spec: str | int | list[int] | tuple[int, ...] | range | None) -> list[str | int] | None:
    """Parse a block selection: ``"0-3,7"``, ``"first:2"``, ``"last:4"``, ints.

    Returns a list of ints and ``("first"|"last", n)`` markers kept symbolic,
    because the number of blocks is only known once a model is at hand.
    """
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple, range)):
        items: list[Any] = []
        for item in spec:
            items.extend(parse_blocks(item) or [])
        return items
    items = []
    for token in str(spec).replace(" ", "").split(","):
        if not token:
            continue
        match = re.fullmatch(r"(first|last):(\d+)|(-?\d+)(?:-(\d+))?", token)
        if not match:
            raise SpecError(
                f"cannot read block selection {token!r} in {spec!r}",
                hint='write indices and ranges like "0-3,7", or "first:2" / "last:4"',
            )
        if match.group(1):
            items.append(f"{match.group(1)}:{match.group(2)}")
        elif match.group(4) is not None:
            start, stop = int(match.group(3)), int(match.group(4))
            if stop < start:
                raise SpecError(f"block range {token!r} runs backwards", hint=f"write {stop}-{start}")
            items.extend(range(start, stop + 1))
        else:
            items.append(int(match.group(3)))
    return items


def resolve_blocks(selection: list[str | int], count: int, knob: str) -> set[int]:
    """Turn a parsed selection into concrete indices for a stack of `count` blocks."""
    chosen: set[int] = set()
    for item in selection:
        if isinstance(item, str):
            side, n = item.split(":")
            n = int(n)
            if n > count:
                raise SpecError(f"{knob}: {item!r} asks for {n} blocks but the model has {count}",
                                hint=f"use a number from 1 to {count}")
            chosen.update(range(n) if side == "first" else range(count - n, count))
        else:
            index = item + count if item < 0 else item
            if not 0 <= index < count:
                raise SpecError(f"{knob}: block {item} is out of range; the model has blocks 0-{count - 1}",
                                hint=f"pick indices between 0 and {count - 1} (negative counts from the end)")
            chosen.add(index)
    return chosen
