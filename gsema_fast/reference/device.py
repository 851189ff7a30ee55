"""Device state that launches read: the current device for a launch, and a cache that is safe under CUDA graphs.

CUDA graphs replay the addresses they captured, so device state that a launch reads (the multi-tensor launch tables,
BACL's high-pass masks) must outlive every graph that captured it. Such state is therefore built only outside a
capture: a launch being captured finds its state in the cache or raises, and an entry a capture used is pinned,
never evicted.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device (hence its current stream the launch stream) for a launch.

    Triton launches on the current device's current stream, and the table copies and scratch allocations of a launch
    go to the tensors' device's current stream: both must be the tensors' device.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capturing(device: torch.device) -> bool:
    """Whether work issued now for ``device`` is being captured into a CUDA graph (never on other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class GraphSafeCache:
    """A least-recently-used cache of device state that launches read, safe under CUDA-graph capture.

    Outside a capture: an ordinary LRU cache of ``size`` entries. During a capture: a missing entry raises (building
    it would copy from host memory at replay time into memory the graph owns, and leave the cached copy unwritten
    until then), and an entry that is found is pinned: it lives as long as the process (or until :meth:`clear`), as
    long as any graph that captured its address.
    """

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what
        self.recent: OrderedDict[Hashable, object] = OrderedDict()
        self.pinned: dict[Hashable, object] = {}

    def get(self, key: Hashable, build: Callable[[], object], device: torch.device):
        value = self.pinned.get(key)
        if value is not None:
            return value
        value = self.recent.get(key)
        if capturing(device):
            if value is None:
                raise RuntimeError(
                    f"the {self.what} for these tensors is built on their first use outside a CUDA graph capture: "
                    "run the op once on the same tensors before capturing (the usual warm-up)"
                )
            self.pinned[key] = self.recent.pop(key)
            return value
        if value is not None:
            self.recent.move_to_end(key)
            return value
        value = build()
        self.recent[key] = value
        if len(self.recent) > self.size:
            self.recent.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every entry, pinned ones too: only when no captured graph that used them will replay again."""
        self.recent.clear()
        self.pinned.clear()
