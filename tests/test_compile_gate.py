"""The compile gate: every kernel variant the launchers can produce compiles for real NVIDIA GPUs, within static
resource budgets, and the list of variants is complete.

Triton's interpreter, under which the other kernel tests run on the CPU, never calls the compiler. Here each variant
of ``gsema_fast.kernels.variants()`` goes through Triton's whole pipeline to a cubin for sm_80 and sm_90 (and every
newer target the installed Triton builds offline), in fresh worker processes (``bench/compile_gate.py``), with the
resources read from the cubin. Compiled results are cached by kernel source, variant, target and Triton version, so
only a changed kernel is compiled again.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from bench import compile_gate  # noqa: E402
from gsema_fast import kernels, ops  # noqa: E402
from gsema_fast.kernels import _multi_tensor, _variants  # noqa: E402
from gsema_fast.kernels import bacl as bacl_kernels  # noqa: E402
from gsema_fast.reference.multi_tensor import FLOAT_DTYPES, can_average  # noqa: E402

STREAMING = ("_grad_stats_kernel", "_gsema_update_kernel", "_fused_ema_kernel")
BACL_STREAMING = ("_bacl_fwd_kernel", "_bacl_bwd_kernel")
# 64 registers per thread is the most that still lets an sm_90 multiprocessor hold half its threads (65536 / 1024).
REGISTER_BUDGET = 64
# Variants allowed above the budget, each with its reason (`python -m bench.compile_gate` prints the figures).
OVER_BUDGET = [
    ("_bacl_reduce_kernel", lambda c: True, "one program of one warp (the final reduction): occupancy does not apply"),
    ("_sum_rows_kernel", lambda c: True, "one program (the final reduction): occupancy does not apply"),
    (
        "_bacl_bwd_kernel",
        lambda c: c["EXTRA"] == 2 and c["VEC"] == 8,
        "the reference mask with 16-bit latents: the real parts of a complex gradient, read at a stride of two "
        "floats, beside four 16-byte feature loads (the public code's parity mode)",
    ),
    (
        "_bacl_fwd_kernel",
        lambda c: c["MODE"] == bacl_kernels.COMPLEX_ABS and c["ACC"] == bacl_kernels.tl.float64,
        "complex features in fp64 (the reference mask on float64 latents: a parity and test mode)",
    ),
    (
        "_bacl_bwd_kernel",
        lambda c: c["MODE"] == bacl_kernels.COMPLEX_ABS and c["ACC"] == bacl_kernels.tl.float64,
        "complex features in fp64 (the reference mask on float64 latents: a parity and test mode)",
    ),
]


def _constexprs(result: dict) -> dict:
    variant = kernels.variants()[result["index"]]
    return dict(variant.constexprs)


@pytest.fixture(scope="module")
def gate():
    targets, results = compile_gate.run_gate()
    return targets, results


@pytest.mark.slow
def test_every_variant_compiles_for_every_target(gate):
    targets, results = gate
    assert set(compile_gate.REQUIRED_TARGETS) <= set(targets)
    failed = [f"sm_{r['target']} {r['variant']}: {r['error'].splitlines()[-1]}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert len(results) == len(kernels.variants()) * len(targets)


@pytest.mark.slow
def test_no_kernel_spills_on_sm90(gate):
    _, results = gate
    spills = [f"{r['variant']}: stack {r['stack']} B, local {r['local']} B" for r in _sm90(results) if r["stack"]]
    spills += [f"{r['variant']}: local {r['local']} B" for r in _sm90(results) if r["local"]]
    assert not spills, "\n".join(spills)


@pytest.mark.slow
def test_aligned_chunks_are_read_with_16_byte_loads(gate):
    """The streaming kernels and BACL on aligned inputs issue 128-bit global loads (``ld.global.v4.b32`` and the
    like); BACL's complex features (the reference mask) are read as pairs, 64 bits."""
    _, results = gate
    narrow = []
    for r in _sm90(results):
        c = _constexprs(r)
        if r["kernel"] in STREAMING + BACL_STREAMING and c["ALIGNED"] and c.get("MODE") != bacl_kernels.COMPLEX_ABS:
            if r["max_load_bits"] < 128:
                narrow.append(f"{r['variant']}: widest load {r['max_load_bits']} bits")
    assert not narrow, "\n".join(narrow)


@pytest.mark.slow
def test_registers_leave_half_the_threads_on_sm90(gate):
    _, results = gate
    over = []
    for r in _sm90(results):
        c = _constexprs(r)
        allowed = any(name == r["kernel"] and applies(c) for name, applies, _ in OVER_BUDGET)
        if r["registers"] > REGISTER_BUDGET and not allowed:
            over.append(f"{r['variant']}: {r['registers']} registers")
    assert not over, "\n".join(over)


def _sm90(results):
    return [r for r in results if r["target"] == 90 and r["ok"]]


def _launched_by_training(variant) -> bool:
    """A variant a bf16 training on a GPU launches: aligned streams of fp32 and bf16, BACL on bf16 latents and on
    fp32 boundary features (the symmetric mask)."""
    c = dict(variant.constexprs)
    codes = {_multi_tensor.DTYPE_CODES[torch.float32], _multi_tensor.DTYPE_CODES[torch.bfloat16]}
    if not c.get("ALIGNED"):
        return False
    if variant.name in STREAMING:
        return all(value in codes for key, value in c.items() if key.endswith("_CODE"))
    if variant.name in BACL_STREAMING:
        return (c["MODE"], variant.args[0][1]) in ((bacl_kernels.IDENTITY, "*bf16"), (bacl_kernels.ABS, "*fp32"))
    return False


@pytest.mark.gpu
def test_the_device_reports_what_the_gate_reads():
    """On a GPU: each variant the paper's training launches (aligned fp32/bf16 streams, BACL on bf16 latents and
    fp32 boundary features), compiled for this device and loaded, reports the registers the gate read from its
    cubin, and no spill."""
    major, minor = torch.cuda.get_device_capability()
    target = 10 * major + minor
    chosen = [v for v in kernels.variants() if _launched_by_training(v)]
    assert chosen
    for variant in chosen:
        compiled = compile_gate.compile_for(variant, target)
        compiled._init_handles()
        static = compile_gate.resources(compiled, target)
        assert compiled.n_regs == static["registers"], variant.describe()
        assert compiled.n_spills == 0 and static["stack"] == 0, variant.describe()


# ------------------------------------------------------------------------------------- the list is complete


def test_every_kernel_parameter_is_in_its_variants():
    problems = [p for v in kernels.variants() for p in compile_gate.variant_problems(v)]
    assert not problems, "\n".join(problems)


def test_the_completeness_check_sees_a_missing_constexpr_or_specialised_argument():
    variant = kernels.variants()[0]
    assert compile_gate.variant_problems(dataclasses.replace(variant, constexprs=variant.constexprs[:-1]))
    assert compile_gate.variant_problems(dataclasses.replace(variant, args=variant.args[:-1]))
    renamed = ((variant.args[1][0], "i32"), *variant.args[:1], *variant.args[2:])
    assert compile_gate.variant_problems(dataclasses.replace(variant, args=renamed))


def test_every_float_dtype_is_in_the_variants():
    codes = {_multi_tensor.DTYPE_CODES[d] for d in FLOAT_DTYPES}
    by_kernel: dict[str, set] = {}
    for v in kernels.variants():
        c = dict(v.constexprs)
        for key in ("A_CODE", "B_CODE", "E_CODE", "C_CODE", "T_CODE", "S_CODE"):
            if key in c:
                by_kernel.setdefault(f"{v.name}.{key}", set()).add(c[key])
    assert all(found == codes for found in by_kernel.values()), by_kernel
    ema = [dict(v.constexprs) for v in kernels.variants() if v.name == "_fused_ema_kernel"]
    codes_of = _multi_tensor.DTYPE_CODES
    want = {(codes_of[a], codes_of[b]) for a in FLOAT_DTYPES for b in FLOAT_DTYPES if can_average(a, b)}
    assert {(c["E_CODE"], c["C_CODE"]) for c in ema} == want
    bacl_types = {v.args[0][1] for v in kernels.variants() if v.name == "_bacl_fwd_kernel"}
    assert bacl_types == {_variants.pointer(d) for d in FLOAT_DTYPES}


# ------------------------------------------------------------------------------- every launch is listed


@pytest.fixture
def launches(monkeypatch):
    """Every launch the ops make, as (variant, the Triton types of its runtime arguments)."""
    seen = []
    original = _variants.Variant.launch

    def record(self, grid, *args):
        seen.append((self, tuple(_variants.signature_type(a) for a in args)))
        return original(self, grid, *args)

    monkeypatch.setattr(_variants.Variant, "launch", record)
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    return seen


def _unaligned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n + 1).to(dtype)[1:]  # one element in: not on a 16-byte boundary


def _lists(x_dtype, y_dtype, aligned: bool):
    make = (lambda n, d: torch.randn(n).to(d)) if aligned else _unaligned
    return [make(3000, x_dtype), make(37, x_dtype)], [make(3000, y_dtype), make(37, y_dtype)]


@pytest.mark.slow
def test_every_launch_is_a_listed_variant(launches):
    listed = set(kernels.variants(_multi_tensor.LAYOUT))
    averages = [(a, b) for a in FLOAT_DTYPES for b in FLOAT_DTYPES if can_average(a, b)]
    for aligned in (True, False):
        for a_dtype in FLOAT_DTYPES:
            for b_dtype in FLOAT_DTYPES:
                a, b = _lists(a_dtype, b_dtype, aligned)
                ops.grad_stats(a, b)
                ops.grad_stats(a, b, accumulate_into_a=True)
        for e_dtype, c_dtype in averages:
            e, c = _lists(e_dtype, c_dtype, aligned)
            ops.fused_ema_(e, c, 0.25)
            ops.fused_ema_(e, c, torch.tensor(0.25, dtype=torch.float64))
            for stats_dtype, step in ((torch.float64, None), (torch.float32, 3), (torch.float64, torch.tensor(4))):
                stats = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=stats_dtype)
                ops.gsema_update_(e, c, stats, decay_aligned=0.9, decay_conflict=1.0, step=step, rule="sign")
    for dtype in FLOAT_DTYPES:
        for shape in ((2, 4, 4, 4, 4), (1, 3, 5, 3, 7)):  # aligned samples, and samples that are not
            for mask in ("symmetric", "reference"):
                for volume, boundary in ((True, True), (True, False), (False, True)):
                    zs = [torch.randn(shape, dtype=dtype, requires_grad=i < 2) for i in range(4)]
                    ops.bacl_loss(*zs, mask=mask, volume=volume, boundary=boundary).backward()
    assert launches
    unlisted = {v.describe() for v, _ in launches if v not in listed}
    assert not unlisted, "\n".join(sorted(unlisted))
    mistyped = {f"{v.describe()}: {types}" for v, types in launches if types != tuple(t for _, t in v.args)}
    assert not mistyped, "\n".join(sorted(mistyped))
    launched = {v for v, _ in launches}
    assert len(launched) > 100


def test_launch_options_name_fp_fusion():
    """Triton 3.10 turns FP fusion off by default: the launches name it, so every version compiles the same maths."""
    assert all(v.options["enable_fp_fusion"] is True for v in kernels.variants())
    assert all(v.options["num_warps"] == v.num_warps for v in kernels.variants())
