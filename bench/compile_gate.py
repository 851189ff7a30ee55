"""The compile gate: every kernel variant the launchers can produce, compiled for real NVIDIA targets with no GPU.

Triton's interpreter, which the CPU tests run the kernels under, executes a kernel as Python and never calls the
compiler, so code that it runs can still fail to compile. Here each variant of ``gsema_fast.kernels.variants()`` goes
through Triton's whole pipeline (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``: TTIR, TTGIR, LLVM IR,
PTX, and a cubin from the ``ptxas`` shipped in the Triton wheel), and its static resources are read from the cubin
with the ``cuobjdump`` shipped beside it: registers, stack, local (spilled) and shared memory, and the widest global
load in the PTX.

Results are cached by a hash of the kernel's source and dependencies, the variant, the target and the Triton version
(``~/.cache/gsema-fast/compile-gate``), and compiled in parallel worker processes. ``tests/test_compile_gate.py``
asserts on them; from the repository root::

    python -m bench.compile_gate                    # every target the installed Triton builds; table to stdout
    python -m bench.compile_gate --targets 90 --markdown resources.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gsema_fast.files import cache_root, write_json

log = logging.getLogger(__name__)

# A100, H100/H200, B200, RTX 50x0: the first two are required; the newer ones are compiled where the installed Triton
# can build them offline.
REQUIRED_TARGETS = (80, 90)
TARGETS = (80, 90, 100, 120)
_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?\.v(\d)\.[a-z](\d+)\b")
_SCALAR_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?\.[a-z](\d+)\b")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _kernels():
    # The worker compiles real kernels: Triton's interpreter (which the test session turns on) must be off before
    # the kernel modules are decorated, that is before their first import in this process.
    os.environ["TRITON_INTERPRET"] = "0"
    from gsema_fast import kernels

    if kernels.INTERPRETED:
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1 in this process: compile in a fresh one")
    return kernels


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _cache_key(variant, target: int) -> str:
    import triton

    parts = [triton.__version__, str(target), variant.kernel.cache_key, repr(variant.args), variant.describe()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _max_load_bits(ptx: str) -> int:
    widths = [int(v) * int(bits) for v, bits in _LOAD.findall(ptx)]
    widths += [int(bits) for bits in _SCALAR_LOAD.findall(ptx)]
    return max(widths, default=0)


def compile_variant(index: int, target: int, cache_dir: str | None) -> dict[str, Any]:
    """Compile variant ``index`` of ``kernels.variants()`` for ``sm_<target>``; its resources, or its error."""
    kernels = _kernels()
    variant = kernels.variants()[index]
    key = _cache_key(variant, target)
    cached = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return {**json.loads(cached.read_text()), "index": index, "cached": True}
    import triton

    result: dict[str, Any] = {
        "kernel": variant.name,
        "variant": variant.describe(),
        "target": target,
        "triton": triton.__version__,
    }
    start = time.perf_counter()
    try:
        compiled = compile_for(variant, target)
    except Exception as err:  # noqa: BLE001 - a compile failure of any kind is the gate's finding, reported whole
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[-2000:])
    else:
        result.update(ok=True, **resources(compiled, target))
    result["seconds"] = round(time.perf_counter() - start, 2)
    if cached is not None and result["ok"]:
        write_json(result, cached)
    return {**result, "index": index, "cached": False}


def compile_for(variant, target: int):
    """``variant`` through Triton's whole pipeline for ``sm_<target>``, as its launch would compile it: the signature
    and constexprs of the variant, no argument specialised, its warps and FP fusion."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**dict(variant.args), **{name: "constexpr" for name, _ in variant.constexprs}}
    return triton.compile(
        ASTSource(variant.kernel, signature, dict(variant.constexprs)),
        target=GPUTarget("cuda", target, 32),
        options={"num_warps": variant.num_warps, "enable_fp_fusion": True},
    )


def resources(compiled, target: int) -> dict[str, Any]:
    """Registers, stack, local and shared memory (bytes) of a compiled kernel, read from its cubin, and the widest
    global load of its PTX (bits)."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run(
            [str(_tool("cuobjdump")), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    found = _RESOURCES.search(out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for sm_{target}:\n{out}")
    registers, stack, static_shared, local = (int(v) for v in found.groups())
    return {
        "registers": registers,
        "stack": stack,
        "local": local,
        "shared": static_shared + int(compiled.metadata.shared),
        "max_load_bits": _max_load_bits(compiled.asm["ptx"]),
    }


def run_gate(
    targets: Sequence[int] | None = None,
    *,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    kernel: str | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Every variant (of ``kernel`` alone, if named) for every target, compiled in ``workers`` fresh processes:
    ``(targets, results)``, the results in variant, target order. ``targets=None``: the required ones and every
    newer one that the installed Triton builds offline (probed on the smallest variant)."""
    names = _variant_names()
    folder = str(cache_dir if cache_dir is not None else cache_root() / "compile-gate")
    context = multiprocessing.get_context("spawn")  # fresh processes: the kernels compiled, never interpreted
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count() or 1, mp_context=context) as pool:
        if targets is None:
            smallest = next(i for i, name in enumerate(names) if name.startswith("_sum_rows_kernel"))
            probes = pool.map(_compile_job, [(smallest, t, None) for t in TARGETS])
            targets = [p["target"] for p in probes if p["ok"] or p["target"] in REQUIRED_TARGETS]
        chosen = [i for i, name in enumerate(names) if kernel is None or name.startswith(kernel + "[")]
        jobs = [(index, target, folder) for index in chosen for target in targets]
        results = list(pool.map(_compile_job, jobs, chunksize=4))
    return list(targets), results


def _compile_job(job: tuple[int, int, str | None]) -> dict[str, Any]:
    return compile_variant(*job)


def _variant_names() -> list[str]:
    # The same list, in the same order, as the workers': variants() lists the compiled layout whether or not this
    # process interprets the kernels.
    from gsema_fast import kernels

    return [v.describe() for v in kernels.variants()]


def variant_problems(variant) -> list[str]:
    """What ``variant`` leaves out of its kernel, each as a line: a constexpr or runtime parameter it misses or
    misnames, an integer argument Triton would compile again for values 1 and multiples of 16, a pointer argument
    it would compile again per alignment. Empty for a variant that says everything Triton compiles on."""
    parameters = inspect.signature(variant.kernel.fn).parameters
    constexprs = {name for name, p in parameters.items() if "constexpr" in str(p.annotation)}
    runtime = [name for name in parameters if name not in constexprs]
    problems = []
    if {name for name, _ in variant.constexprs} != constexprs:
        problems.append(f"{variant.name}: constexprs {sorted(constexprs)}, the variant lists {variant.constexprs}")
    if [name for name, _ in variant.args] != runtime:
        problems.append(f"{variant.name}: runtime arguments {runtime}, the variant lists {variant.args}")
    no_value, no_alignment = _unspecialised(variant.kernel, list(parameters))
    for name, kind in variant.args:
        if kind in ("i32", "i64") and name not in no_value:
            problems.append(f"{variant.name}: integer argument {name} is not in do_not_specialize")
        if kind.startswith("*") and name not in no_alignment:
            problems.append(f"{variant.name}: pointer argument {name} is not in do_not_specialize_on_alignment")
    return problems


def _unspecialised(kernel, names: list[str]) -> tuple[set[str], set[str]]:
    # A compiled kernel keeps the decorator's lists as attributes, the interpreter's wrapper in its keyword arguments.
    options = getattr(kernel, "kwargs", None)
    if options is None:
        options = {k: getattr(kernel, k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}

    def as_names(items) -> set[str]:
        return {names[i] if isinstance(i, int) else i for i in (items or ())}

    return as_names(options.get("do_not_specialize")), as_names(options.get("do_not_specialize_on_alignment"))


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """The static resource table of ``results``: one row per variant and target."""
    lines = [
        "| kernel | variant | sm | registers | stack (B) | local (B) | shared (B) | widest load (bits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | `{r['variant']}` | {r['target']} | FAILED | | | | |")
            continue
        variant = r["variant"].split("[", 1)[1].rstrip("]")
        lines.append(
            f"| {r['kernel']} | `{variant}` | {r['target']} | {r['registers']} | {r['stack']} | {r['local']} | "
            f"{r['shared']} | {r['max_load_bits']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=None, help="comma-separated compute capabilities (default: all buildable)")
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: one per core)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the resource table here")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--kernel", default=None, help="only the variants of this kernel (e.g. _grad_stats_kernel)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    cache = tempfile.mkdtemp() if args.no_cache else None
    wanted = [int(t) for t in args.targets.split(",")] if args.targets else None
    targets, results = run_gate(wanted, workers=args.workers, cache_dir=cache, kernel=args.kernel)
    failed = [r for r in results if not r["ok"]]
    log.info(
        "%d compilations (%d variants x targets %s) in %.0f s, %d failed",
        len(results),
        len(results) // len(targets),
        ",".join(map(str, targets)),
        time.perf_counter() - start,
        len(failed),
    )
    for r in failed:
        log.error("sm_%s %s: %s", r["target"], r["variant"], r["error"].splitlines()[-1] if r["error"] else "")
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table)
    else:
        sys.stdout.write(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
