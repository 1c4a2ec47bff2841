"""Reading the event log of `counting.LiveBytes`: peaks per step, the breakdown at the peak, where activations live;
and the figures of a model with N identical blocks, from runs with 2 and 3 of them (`extrapolated`).

Per step the figures are what CUDA reports after `torch.cuda.reset_peak_memory_stats()` at the step's start:
the peak is the most bytes live at any moment of the step (counting what was live when it began), the
reserved figure is the caching allocator's segments (they only grow), and "after" is what stays live.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

KINDS = ("weights", "gradients", "optimizer state", "activations", "temporaries", "workspace")  # the breakdown's


@contextlib.contextmanager
def module_names(net: Any, counter: Any):
    """Keep `counter.modules` on the module that is running (forward, and recomputation in backward)."""
    import torch

    names = {id(m): n.removeprefix("base_model.model.") for n, m in net.named_modules()}

    def enter(module: Any, *_: Any) -> None:
        counter.modules.append(names.get(id(module), type(module).__name__))

    def leave(module: Any, *_: Any) -> None:
        if len(counter.modules) > 1:
            counter.modules.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def replay(counter: Any, allocator: Any) -> dict:
    """Per-step and overall peaks, the live set at the peak by category, top modules by saved activations."""
    storages, events = counter.storages, counter.events
    marks: dict[int, list[tuple[int, str]]] = {}
    for index, step, phase in counter.marks:
        marks.setdefault(index, []).append((step, phase))
    free_at: dict[int, int] = {}
    starts: dict[tuple[int, str], int] = {}
    for index, step, phase in counter.marks:
        starts.setdefault((step, phase), index)
    live, step, phase = 0, 0, "setup"
    steps: dict[int, dict] = {}
    best = (-1, 0, 0, "setup")  # (bytes, event index, step, phase)
    phase_peaks: dict[tuple[int, str], tuple[int, int, int]] = {}  # (bytes, event index, reserved then)
    for index, sid in enumerate(events + [0]):
        for step, phase in marks.get(index, ()):
            if phase == "forward":
                steps[step] = {"peak_allocated": live, "peak_phase": "forward"}
        if sid == 0:
            break
        if sid > 0:
            live += storages[sid].size
            allocator.malloc(sid, storages[sid].size)
        else:
            live -= storages[-sid].size
            allocator.free(-sid)
            free_at[-sid] = index
        current = steps.get(step)
        if current is not None and phase not in ("end", "done"):
            if live > current["peak_allocated"]:
                current.update(peak_allocated=live, peak_phase=phase)
            current["peak_reserved"] = allocator.reserved
            if live > phase_peaks.get((step, phase), (-1,))[0]:
                phase_peaks[(step, phase)] = (live, index, allocator.reserved)
            if live > best[0]:
                best = (live, index, step, phase)
        if current is not None and phase != "done":
            current["allocated_after"] = live
    peak, peak_index, peak_step, peak_phase = best
    return {"steps": [dict(steps[s], step=s) for s in sorted(steps)], "peak_allocated": peak,
            "peak_step": peak_step, "peak_phase": peak_phase,
            "peak_module": _module_at(counter, peak_index),
            "breakdown": _breakdown(counter, peak_index, free_at, starts),
            "top_activations": _top_activations(counter, free_at, starts),
            "peak_reserved": allocator.reserved,
            "phase_peaks": [{"step": s, "phase": ph, "peak_allocated": b, "reserved": r,
                             "breakdown": _breakdown(counter, i, free_at, starts), "module": _module_at(counter, i)}
                            for (s, ph), (b, i, r) in phase_peaks.items()],
            "timeline": timeline(counter, peak_step, peak_index, free_at, starts)}


def timeline(counter: Any, step: int, peak_index: int, free_at: dict, starts: dict, points: int = 1500) -> dict:
    """Bytes live by kind (the breakdown's) over one step's allocations and frees, forward to optimizer, for the
    memory picture (`lorakit.cost.plot`). At most `points` samples: each is the event with the most bytes live in
    its stretch, and the peak's event is always one, so the drawn maximum is the peak."""
    first = starts.get((step, "forward"), 0)
    last = starts.get((step, "end"), len(counter.events))
    stretch = max(1, -(-(last - first) // points))
    live = dict.fromkeys(KINDS, 0)
    samples: list[tuple[int, list[int]]] = []
    best: tuple[int, int, list[int]] | None = None  # (total, index, bytes by kind) in the current stretch
    for index, sid in enumerate(counter.events[:last]):
        storage = counter.storages[abs(sid)]
        live[_category(storage, abs(sid), free_at, starts)] += storage.size if sid > 0 else -storage.size
        if index < first:
            continue
        total = sum(live.values())
        if best is None or total > best[0] or index == peak_index:
            best = (total if index != peak_index else 1 << 62, index, list(live.values()))
        if (index - first + 1) % stretch == 0 or index == last - 1:
            samples.append((best[1], best[2]))
            best = None
    phases = sorted((i, phase) for (s, phase), i in starts.items() if s == step and first <= i < last)
    return {"step": step, "kinds": list(KINDS), "events": [i - first for i, _ in samples],
            "bytes": [b for _, b in samples], "phases": [(phase, i - first) for i, phase in phases],
            "peak_event": peak_index - first}


def _module_at(counter: Any, index: int) -> str:
    sid = counter.events[index] if 0 <= index < len(counter.events) else 0
    if not sid:
        return ""
    storage = counter.storages[abs(sid)]
    return " / ".join(x for x in (storage.module, storage.op) if x)


def _category(storage: Any, sid: int, free_at: dict, starts: dict) -> str:
    if storage.role:
        return storage.role
    if storage.phase in ("setup", "workspace"):
        return "weights" if storage.phase == "setup" else "workspace"
    if storage.phase == "forward":
        backward = starts.get((storage.step, "backward"), 1 << 62)
        return "activations" if free_at.get(sid, 1 << 62) > backward else "temporaries"
    return "temporaries"


def _breakdown(counter: Any, peak_index: int, free_at: dict, starts: dict) -> dict[str, int]:
    alive: set[int] = set()
    for sid in counter.events[:peak_index + 1]:
        if sid > 0:
            alive.add(sid)
        else:
            alive.discard(-sid)
    out = dict.fromkeys(KINDS, 0)
    for sid in alive:
        storage = counter.storages[sid]
        out[_category(storage, sid, free_at, starts)] += storage.size
    return out


def _top_activations(counter: Any, free_at: dict, starts: dict, count: int = 10) -> list[tuple[str, int]]:
    backward = starts.get((1, "backward"), 1 << 62)
    by_module: dict[str, int] = {}
    for sid, storage in counter.storages.items():
        if storage.step == 1 and storage.phase == "forward" and free_at.get(sid, 1 << 62) > backward:
            key = storage.module or "(outside modules)"
            by_module[key] = by_module.get(key, 0) + storage.size
    return sorted(by_module.items(), key=lambda item: -item[1])[:count]


def extrapolated(two: Any, three: Any, blocks: int) -> Any:
    """Every allocated byte count of `three` plus (blocks - 3) times what the third block added over `two`,
    phase by phase, so that the whole model's peak may fall in another phase than the 3-block run's. The
    caching allocator's reserved segments do not grow block by block (a segment is shared or not): at each
    point the 3-block run's reserved-over-allocated is kept."""
    def grow(a: Any, b: Any) -> Any:
        if isinstance(b, bool) or not isinstance(b, int) or not isinstance(a, int):
            return b
        return b + (blocks - 3) * (b - a)

    small = {(p["step"], p["phase"]): p for p in two.phase_peaks}
    phases = []
    for p in three.phase_peaks:
        q = small.get((p["step"], p["phase"]), p)
        allocated = grow(q["peak_allocated"], p["peak_allocated"])
        phases.append(dict(p, peak_allocated=allocated, reserved=allocated + p["reserved"] - p["peak_allocated"],
                           breakdown={k: grow(q["breakdown"].get(k, 0), v) for k, v in p["breakdown"].items()},
                           module=p["module"].replace(".2.", f".{blocks - 1}.", 1)))
    peak = max(phases, key=lambda p: p["peak_allocated"])
    result = dataclasses.replace(three, peak_allocated=peak["peak_allocated"], peak_step=peak["step"], peak_phase=peak["phase"],
                     peak_module=peak["module"], breakdown=peak["breakdown"], phase_peaks=phases,
                     setup_allocated=grow(two.setup_allocated, three.setup_allocated),
                     host_peak=grow(two.host_peak, three.host_peak), step_flops=grow(two.step_flops, three.step_flops),
                     peak_reserved=max(p["reserved"] for p in phases), timeline=None)  # the 3-block run's
    result.steps = []
    for step in three.steps:
        mine = [p for p in phases if p["step"] == step["step"] and p["phase"] not in ("end", "done")]
        top = max(mine, key=lambda p: p["peak_allocated"])
        before = next(s for s in two.steps if s["step"] == step["step"])
        result.steps.append(dict(step, peak_allocated=top["peak_allocated"], peak_phase=top["phase"],
                                 peak_reserved=max(p["reserved"] for p in mine),
                                 allocated_after=grow(before["allocated_after"], step["allocated_after"])))
    return result
