"""What Triton compiles: every variant of every kernel that a launcher can produce, in one list the compile gate reads.

Triton compiles a kernel once per distinct combination of argument types, argument specialisations, constexpr values
and launch options. Each launcher in this package launches through a :class:`Variant` built by a function of its
module, and each module's ``variants(layout)`` lists every variant those functions can return;
``gsema_fast.kernels.variants()`` joins the lists, and the compile gate (``bench/compile_gate.py``, run by
``tests/test_compile_gate.py``) compiles each for every GPU target. For that list to be complete:

- integer arguments are never specialised on their value (``do_not_specialize``): Triton would otherwise compile
  another kernel when a count happens to be 1 or a multiple of 16;
- pointer arguments are never specialised on their alignment (``do_not_specialize_on_alignment``); where alignment
  enables 16-byte loads the launcher checks it and passes it as an ``ALIGNED`` constexpr;
- the dtype of every tensor argument is part of the variant: launchers convert what they accept to those dtypes.

``tests/test_compile_gate.py`` checks each of these against the kernels' own signatures, and that every launch the
ops make is one of the listed variants.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch

# Triton's names of the element types of the tensors the kernels take.
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
}


def pointer(dtype: torch.dtype) -> str:
    """The signature type of a tensor argument of ``dtype``: ``"*fp32"`` and so on."""
    return "*" + TRITON_TYPES[dtype]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: the types of its runtime arguments, its constexprs and its launch options."""

    kernel: Any  # the @triton.jit function (the interpreter's wrapper under TRITON_INTERPRET=1)
    args: tuple[tuple[str, str], ...]  # the runtime arguments in order: (name, Triton type: "*fp32", "i32", "fp32")
    constexprs: tuple[tuple[str, Any], ...]  # (name, value) of every constexpr parameter
    num_warps: int

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @functools.cached_property
    def options(self) -> dict[str, Any]:
        # FP fusion is Triton's default before 3.10 and off after: named, so every version compiles the same code.
        return {**dict(self.constexprs), "num_warps": self.num_warps, "enable_fp_fusion": True}

    def launch(self, grid: tuple[int, ...], *args: Any) -> None:
        """Launch on the current device's current stream with ``args`` in :attr:`args` order."""
        self.kernel[grid](*args, **self.options)

    def describe(self) -> str:
        """One line naming the kernel, the constexprs and the types that set this variant apart."""
        constants = ", ".join(f"{k}={_short(v)}" for k, v in self.constexprs)
        pointers = ", ".join(f"{k}:{t}" for k, t in self.args if t.startswith("*") and t != "*i64")
        return f"{self.name}[{constants}; {pointers}; warps={self.num_warps}]"


def _short(value: Any) -> str:
    return getattr(value, "name", None) or str(value)


def signature_type(value: Any) -> str:
    """The signature type Triton gives a runtime argument ``value`` (unspecialised), for checking a launch."""
    if isinstance(value, torch.Tensor):
        return pointer(value.dtype)
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


def check_int32(value: int, name: str) -> int:
    """``value`` if it fits the kernels' 32-bit index arguments, else ``ValueError`` naming it."""
    if not 0 <= value < 2**31:
        raise ValueError(f"{name} must be below 2**31 for the Triton kernels, got {value}")
    return value


def join(*lists: Sequence[Variant]) -> list[Variant]:
    """The variants of several kernels as one list without repeats, in a stable order."""
    return list(dict.fromkeys(v for variants in lists for v in variants))
