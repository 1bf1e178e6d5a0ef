"""Saved-tensor accounting and step peak memory.

``saved_tensors(fn)`` runs ``fn`` under ``torch.autograd.graph.saved_tensors_hooks`` (which fire
for compiled graphs too) and returns what autograd kept for backward: one entry per storage,
parameters excluded. ``peak_rss_above(fn)`` runs ``fn`` and returns the rise of the process's
peak resident memory over its resident size before the call (Linux; CPU); it reads true live
bytes only in a process started with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``,
so that glibc returns freed large blocks to the OS.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Callable

import torch


@dataclasses.dataclass
class SavedTensor:
    shape: tuple[int, ...]
    dtype: str
    bytes: int


def _storage_key(t: torch.Tensor):
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return (t.device.type, id(t))


def saved_tensors(fn: Callable[[], object], params: list[torch.Tensor] = ()) -> list[SavedTensor]:
    """What ``fn``'s graph saves for backward: deduplicated by storage, parameters excluded."""
    skip = {_storage_key(p) for p in params}
    seen: dict = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            key = _storage_key(t)
            if key not in skip and key not in seen:
                nbytes = t.untyped_storage().nbytes()
                seen[key] = SavedTensor(tuple(t.shape), str(t.dtype).replace("torch.", ""), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return list(seen.values())


def saved_bytes(fn: Callable[[], object], params: list[torch.Tensor] = ()) -> int:
    return sum(s.bytes for s in saved_tensors(fn, params))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_above(fn: Callable[[], object]) -> int:
    """Bytes by which ``fn`` raised the peak resident set above the resident size before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return max(0, peak - before) * 1024
