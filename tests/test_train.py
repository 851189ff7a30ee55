"""The teacher-student step and the training loop, on a tiny UNet and tiny phantoms (CPU)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_ctx, params_of, recorded_grad_stats, tiny_batch, tiny_run

from gsema_fast.config import load_config, resolve_auto
from gsema_fast.losses import DiceCE
from gsema_fast.models import repeated_blocks
from gsema_fast.step import flat_gradient_buffers, forward_all, train_step
from gsema_fast.training import train
from gsema_fast.training.build import build_context
from gsema_fast.training.compilation import compile_blocks

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------------ the step


@pytest.mark.parametrize("copies", [1, 3])
def test_flat_gradient_buffers_are_aligned_views_of_one_tensor_per_dtype(copies):
    params = [torch.zeros(3, 5), torch.zeros(7, dtype=torch.bfloat16), torch.zeros(0), torch.zeros(2, 2, 2)]
    buffers, storage = flat_gradient_buffers(params, copies)
    assert len(buffers) == copies and len(storage) == 2  # fp32 and bf16
    flats = {flat.dtype: (flat, n) for flat, n in storage}
    for k, views in enumerate(buffers):
        for p, v in zip(params, views, strict=True):
            assert v.shape == p.shape and v.dtype == p.dtype and v.is_contiguous()
            if v.numel() == 0:  # an empty view has no address
                continue
            flat, n = flats[p.dtype]
            assert (v.data_ptr() - flat.data_ptr()) % 256 == 0
            offset = (v.data_ptr() - flat.data_ptr()) // flat.element_size()
            assert k * n <= offset and offset + v.numel() <= (k + 1) * n  # copy k lies in its own range
            v.fill_(k + 1)
    for flat, n in storage:
        for k in range(copies):
            assert set(flat[k * n : (k + 1) * n].unique().tolist()) <= {0.0, k + 1.0}


def test_three_passes_equal_one_backward_of_the_total():
    ctx = make_ctx("gsema")
    twin, twin_teacher = copy.deepcopy(ctx.student), copy.deepcopy(ctx.teacher)
    batch = tiny_batch()
    out = train_step(ctx, *batch)

    # Reference: one backward of the total loss, on an identical pair, with the same SGD step.
    ref_ctx = copy.copy(ctx)
    ref_ctx.student, ref_ctx.teacher = twin, twin_teacher
    ref = forward_all(ref_ctx, *batch)
    total = 0.25 * (ref["dce_student_src"] + ref["dce_student_trg"]) + 0.5 * ref["bacl"]
    grads = torch.autograd.grad(total, list(twin.parameters()))
    with torch.no_grad():
        for p, g in zip(twin.parameters(), grads, strict=True):
            p.sub_(0.05 * g)
    for got, want in zip(ctx.student.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["total"], total.detach())  # the trained loss; teacher terms are logged apart


def test_step_statistics_equal_separate_autograd_gradients():
    ctx = make_ctx("gsema")
    twin, twin_teacher = copy.deepcopy(ctx.student), copy.deepcopy(ctx.teacher)
    batch = tiny_batch()
    with recorded_grad_stats() as seen:
        train_step(ctx, *batch)
    ref_ctx = copy.copy(ctx)
    ref_ctx.student, ref_ctx.teacher = twin, twin_teacher
    ref = forward_all(ref_ctx, *batch)
    params = list(twin.parameters())
    g_src = torch.autograd.grad(0.25 * ref["dce_student_src"], params, retain_graph=True)
    g_trg = torch.autograd.grad(0.25 * ref["dce_student_trg"], params)
    a = torch.cat([g.reshape(-1) for g in g_src]).double()
    b = torch.cat([g.reshape(-1) for g in g_trg]).double()
    want = torch.stack([a @ b, a @ a, b @ b, (a.sign() * b.sign()).sum(), (a != 0).sum(), (b != 0).sum()])
    torch.testing.assert_close(seen["stats"].double(), want, rtol=1e-4, atol=1e-6)


def test_layer_agreement_is_each_layers_cosine_of_the_separate_gradients():
    """``layers=True``: per weight tensor, the cosine of the source and target gradients, as float64 maths on the
    gradients autograd gives for each term alone."""
    ctx = make_ctx("gsema")
    twin, twin_teacher = copy.deepcopy(ctx.student), copy.deepcopy(ctx.teacher)
    batch = tiny_batch()
    out = train_step(ctx, *batch, layers=True)
    ref_ctx = copy.copy(ctx)
    ref_ctx.student, ref_ctx.teacher = twin, twin_teacher
    ref = forward_all(ref_ctx, *batch)
    named = dict(twin.named_parameters())
    weights = [named[f"{name}.weight"] for name in ctx.layers]
    g_src = torch.autograd.grad(0.25 * ref["dce_student_src"], weights, retain_graph=True)
    g_trg = torch.autograd.grad(0.25 * ref["dce_student_trg"], weights)
    want = torch.stack(
        [
            torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)
            for a, b in zip(g_src, g_trg, strict=True)
        ]
    )
    assert len(ctx.layers) == sum(p.dim() >= 2 for p in twin.parameters())
    torch.testing.assert_close(out["layer_cos"].double(), want, rtol=1e-4, atol=1e-5)
    assert "layer_cos" not in train_step(ctx, *batch)  # only on the steps that ask


@pytest.mark.parametrize("rule", ["dot", "sign"])
def test_teacher_moves_iff_aligned(rule):
    """One aligned step (target = source: identical gradients) and one conflicting step (every target label moved
    to the next class: the two losses pull apart, for both rules); the teacher follows the student on the first
    only."""
    x_s, y_s, _, _ = tiny_batch()
    outcomes = {}
    for name, y_t in (("aligned", y_s.clone()), ("conflicting", (y_s + 1) % 3)):
        ctx = make_ctx("gsema", rule=rule, bacl=False)
        before = params_of(ctx.teacher)
        out = train_step(ctx, x_s, y_s, x_s.clone(), y_t)
        after = params_of(ctx.teacher)
        outcomes[name] = out["aligned"].item()
        if outcomes[name] == 1.0:
            for t0, t1, s in zip(before, after, ctx.student.parameters(), strict=True):
                torch.testing.assert_close(t1, 0.5 * t0 + 0.5 * s.detach())
        else:
            assert all(torch.equal(t0, t1) for t0, t1 in zip(before, after, strict=True))
        assert out["grad_cos"].abs() <= 1.0
    assert outcomes == {"aligned": 1.0, "conflicting": 0.0}


def test_ema_and_none_modes():
    ctx = make_ctx("ema", decay=0.75)
    before = params_of(ctx.teacher)
    out = train_step(ctx, *tiny_batch())
    assert "aligned" not in out
    for t0, t1, s in zip(before, ctx.teacher.parameters(), ctx.student.parameters(), strict=True):
        torch.testing.assert_close(t1.detach(), 0.75 * t0 + 0.25 * s.detach())
    ctx = make_ctx("none")
    train_step(ctx, *tiny_batch())
    assert all(torch.equal(t, s) for t, s in zip(ctx.teacher.parameters(), ctx.student.parameters(), strict=True))


def test_nonfinite_step_is_skipped_on_the_device():
    ctx = make_ctx("gsema")
    student, teacher = params_of(ctx.student), params_of(ctx.teacher)
    x_s, y_s, x_t, y_t = tiny_batch()
    x_s[0, 0, 0, 0, 0] = float("nan")
    out = train_step(ctx, x_s, y_s, x_t, y_t)
    assert out["skipped"].item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(student, ctx.student.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(teacher, ctx.teacher.parameters(), strict=True))
    assert int(ctx.updater.step) == 0
    out = train_step(ctx, *tiny_batch())
    assert out["skipped"].item() == 0.0 and int(ctx.updater.step) == 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the overflowing step, on purpose
def test_fp16_step_with_grad_scaler(one_thread):
    """fp16 autocast with a GradScaler: the statistics are taken on consistently scaled gradients (the decision and
    the cosine are those of fp32), and a step whose scaled gradients overflow is skipped, then the scale drops."""
    fp32 = make_ctx("gsema")
    want = train_step(fp32, *tiny_batch())

    ctx = make_ctx("gsema")
    ctx.amp_dtype = torch.float16
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow at this scale
    student, teacher = params_of(ctx.student), params_of(ctx.teacher)
    out = train_step(ctx, *tiny_batch())
    assert out["skipped"].item() == 1.0 and out["aligned"].item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(student, ctx.student.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(teacher, ctx.teacher.parameters(), strict=True))
    assert int(ctx.updater.step) == 0 and ctx.scaler.get_scale() == 2.0**39

    ctx = make_ctx("gsema")
    ctx.amp_dtype = torch.float16
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    got = train_step(ctx, *tiny_batch())
    assert got["skipped"].item() == 0.0 and int(ctx.updater.step) == 1
    assert got["aligned"].item() == want["aligned"].item()
    assert got["grad_cos"].item() == pytest.approx(want["grad_cos"].item(), abs=2e-3)
    moved = max((a - b).abs().max().item() for a, b in zip(fp32.student.parameters(), student, strict=True))
    for a, b in zip(ctx.student.parameters(), fp32.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * moved)  # the step was unscaled before the optimizer


# ------------------------------------------------------------------------------------------------ the loop


def tiny_config(phantoms, out_dir, *extra):
    return load_config("demo", [*tiny_run(phantoms), "train.deterministic=true", f"train.out_dir={out_dir}", *extra])


def train_records(run_dir):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_train_writes_run_folder_and_resumes_exactly(phantoms, tmp_path, monkeypatch):
    full = train(tiny_config(phantoms, tmp_path / "full"))
    run = full["run_dir"]
    for name in (
        "config.yaml",
        "log.jsonl",
        "progress.png",
        "summary.json",
        "checkpoints/latest.pt",
        "checkpoints/final.pt",
        "checkpoints/best.pt",
    ):
        assert (run / name).is_file(), name
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"dce_student_src", "dce_student_trg", "bacl", "grad_cos", "aligned", "lr", "step_time_s"} <= set(records[0])
    assert all(0 <= r["data_wait_s"] <= r["step_time_s"] for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test"]["mean"]) == {"vessel", "aneurysm"}

    # Interrupt a run with the same config right after its first epoch's checkpoint, then resume it.
    import gsema_fast.training.loop as train_module

    def interrupt(*_args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "draw_progress", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(phantoms, tmp_path / "resumed"))
    resumed = train(tiny_config(phantoms, tmp_path / "resumed"), resume=True)
    again = train_records(resumed["run_dir"])
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for want, got in zip(records, again, strict=True):
        for key in ("total", "dce_student_src", "dce_student_trg", "bacl", "grad_cos"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (key, want["step"])
    ck_full = torch.load(full["final"], weights_only=False)
    ck_resumed = torch.load(resumed["final"], weights_only=False)
    for name, value in ck_full["teacher"].items():
        torch.testing.assert_close(ck_resumed["teacher"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "scored"), [("gsema", True), ("none", False)])
def test_validation_scores_the_student_beside_the_teacher_on_request(phantoms, tmp_path, mode, scored):
    """``train.val_student``: each validation record also holds the student's Dice (a teacher is worth having only
    where it beats its student); without an EMA the teacher mirrors the student and nothing more is scored."""
    run_dir = tmp_path / mode
    train(tiny_config(phantoms, run_dir, "train.val_student=true", f"ema.mode={mode}", "train.epochs=1"))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if r["kind"] == "val"]
    assert ("student_dice" in val) == scored
    if scored:
        assert set(val["student_dice"]) == set(val["dice"])
        assert all(0.0 <= v <= 1.0 for v in val["student_dice"].values())


def test_the_context_takes_the_recall_term_from_the_config():
    cfg = resolve_auto(load_config("demo", ["loss.recall_weight=0.5", "loss.recall_classes=[1,2]"]), "cpu")
    dce = build_context(cfg, torch.device("cpu")).dce
    assert (dce.recall_weight, dce.recall_classes) == (0.5, (1, 2))


@pytest.mark.slow
def test_a_run_with_the_small_sac_levers_trains_and_says_so(phantoms, tmp_path, caplog):
    run_dir = tmp_path / "levers"
    levers = ("loss.recall_weight=1", "data.small_components.ratio=1", "data.small_components.below_mm3=1e6")
    with caplog.at_level(logging.INFO, logger="gsema_fast"):
        train(tiny_config(phantoms, run_dir, *levers, "train.epochs=1"))
    assert "recall term for label values [2], weight 1" in caplog.text
    assert "patches also centred on components of label 2 under 1e+06 mm^3, weight 1" in caplog.text
    saved = load_config(run_dir / "config.yaml")
    assert (saved.loss.recall_weight, saved.data.small_components.ratio) == (1.0, 1.0)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["dce_student_src"]) for r in records if r["kind"] == "train")


@pytest.mark.slow
def test_validation_can_leave_the_mirroring_to_the_end(phantoms, tmp_path):
    """``train.val_mirror=false``: validation during training scores as without mirroring, and the chosen teacher's
    held-out figure is scored once more at the end, mirrored, as with mirrored validation."""
    runs = {
        "plain": ("eval.mirror_axes=[]",),
        "at_the_end": ("eval.mirror_axes=[0]", "train.val_mirror=false"),
        "always": ("eval.mirror_axes=[0]", "train.val_mirror=true"),
    }
    val, summary = {}, {}
    for name, sets in runs.items():
        train(tiny_config(phantoms, tmp_path / name, *sets, "train.epochs=1"))
        records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        (val[name],) = [r["dice"] for r in records if r["kind"] == "val"]
        summary[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert val["at_the_end"] == val["plain"] != val["always"]
    end = summary["at_the_end"]["validation"]
    assert end["dice_without_mirroring"] == summary["plain"]["validation"]["dice"]
    assert end["dice"] == summary["always"]["validation"]["dice"] == val["always"]
    assert summary["at_the_end"]["test"]["mean"] == summary["always"]["test"]["mean"]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "drawn"), [("gsema", True), ("ema", False)])
def test_the_log_holds_each_layers_agreement_and_its_figure(phantoms, tmp_path, mode, drawn):
    """``train.layer_agreement``: every train record of a GS-EMA run holds ``layer_cos`` by layer name, and the run
    draws layer_agreement.png; the other modes never hold the two gradients apart, and log none."""
    run_dir = tmp_path / mode
    train(tiny_config(phantoms, run_dir, f"ema.mode={mode}", "train.epochs=1"))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps and all(("layer_cos" in r) == drawn for r in steps)
    assert (run_dir / "layer_agreement.png").is_file() == drawn
    if drawn:
        cos = steps[-1]["layer_cos"]
        assert len(cos) > 3 and all(-1.0 <= v <= 1.0 for v in cos.values())
        assert all(name.startswith("model.") for name in cos)


@pytest.mark.slow
def test_bench_step_times_every_mode_and_the_data(phantoms, tmp_path):
    from gsema_fast.cli import main

    out = tmp_path / "bench.json"
    overrides = [a for kv in [*tiny_run(phantoms), "train.device=cpu"] for a in ("--set", kv)]
    assert main(["bench-step", *overrides, "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"plain", "reference", "gsema"}
    for result in report["modes"].values():
        assert 0 < result["p20_ms"] <= result["median_ms"] <= result["p80_ms"] and result["first_step_s"] > 0
    assert report["modes"]["plain"]["x_plain"] == 1.0 and report["modes"]["gsema"]["x_plain"] > 0
    assert report["gsema_speedup_vs_reference"] > 0
    assert report["data_ms"] == pytest.approx(report["loader_ms"] + report["target_transform_ms"], abs=0.02)
    assert report["loader_ms"] > 0 and report["compile_cache"] == "off"


@pytest.mark.slow
def test_train_stops_on_repeated_nonfinite_losses(phantoms, tmp_path, monkeypatch):
    monkeypatch.setattr(DiceCE, "forward", lambda self, logits, labels: logits.sum() * float("nan"))
    cfg = tiny_config(
        phantoms, tmp_path / "nan", "train.max_nonfinite_steps=2", "train.epochs=1", "train.steps_per_epoch=3"
    )
    with pytest.raises(RuntimeError, match="2 consecutive steps with a non-finite loss"):
        train(cfg)


def test_train_config_and_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        train(load_config("demo", [f"data.root={tmp_path / 'missing'}", f"train.out_dir={tmp_path / 'run'}"]))
    with pytest.raises(ValueError, match="data.patch_size"):
        load_config("demo", ["model.name=swinunetr", "data.patch_size=[48,48,48]"])
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(load_config("demo", [f"train.out_dir={tmp_path / 'fresh'}"]), resume=True)


def test_compile_blocks_settings(monkeypatch):
    """Compiled SwinUNETR blocks donate their saved buffers, which forbids the second walk of the encoder's backward
    that every GS-EMA step with BACL makes (seen at F=12, 64^3; tiny models compile without donated buffers, so this
    checks the setting); and dynamo must keep an entry for every distinct block rather than stop at 8."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "donated_buffer", True)
    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    ctx = make_ctx("gsema")
    blocks = compile_blocks(ctx)
    assert blocks == 2 * len(repeated_blocks(ctx.student)) > 8
    assert functorch_config.donated_buffer is False
    assert dynamo_config.recompile_limit >= 6 * blocks


COMPILE_RUN = """
import json, sys
from pathlib import Path
from torch._dynamo.utils import counters
from tiny import make_ctx, tiny_batch
from gsema_fast.step import train_step
from gsema_fast.training.compilation import compile_blocks, load_compile_cache, save_compile_cache

cache = Path(sys.argv[1])
warm = load_compile_cache(cache)
ctx = make_ctx("gsema")
blocks = compile_blocks(ctx)
out = train_step(ctx, *tiny_batch())
save_compile_cache(cache)
print(json.dumps({"warm": warm, "blocks": blocks, "total": out["total"].item(), **counters["inductor"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile on the CPU needs a C++ compiler"
)
def test_compile_cache_makes_a_second_run_warm(tmp_path):
    """A compiled GS-EMA step in two fresh processes, each with its own empty inductor cache: the second finds every
    compiled block in our cache file and compiles nothing. The blocks of distinct shapes (more than dynamo's default
    limit of 8 entries per code object) all stay compiled."""
    cache = tmp_path / "compiled.bin"
    runs = []
    for name in ("cold", "warm"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"), "TRITON_INTERPRET": "0"}
        job = subprocess.run(
            [sys.executable, "-c", COMPILE_RUN, str(cache)],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert job.returncode == 0, job.stderr
        assert "recompile_limit" not in job.stderr, job.stderr  # no block fell back to eager
        runs.append(json.loads(job.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert not cold["warm"] and warm["warm"]
    assert cold.get("fxgraph_cache_miss", 0) > 8 and cold.get("fxgraph_cache_hit", 0) == 0
    assert warm.get("fxgraph_cache_miss", 0) == 0 and warm["fxgraph_cache_hit"] == cold["fxgraph_cache_miss"]
    assert warm["total"] == pytest.approx(cold["total"], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["gsema", "ema"])
def test_step_never_waits_for_the_host_on_a_gpu(mode, monkeypatch):
    """A whole training step (bf16 autocast, fused kernels, device-side skip and decision) under
    ``torch.cuda.set_sync_debug_mode("error")``, after a first step that builds the launch tables and optimizer
    state."""
    monkeypatch.delenv("GSEMA_FAST_BACKEND", raising=False)
    ctx = make_ctx(mode)
    for module in (ctx.student, ctx.teacher):
        module.cuda()
    ctx.optimizer = torch.optim.SGD(ctx.student.parameters(), lr=0.05, fused=True)
    ctx.__post_init__()  # gradient buffers on the device
    ctx.amp_dtype = torch.bfloat16
    ctx.dce = DiceCE(recall_weight=1.0, recall_classes=[1, 2])  # the recall term reads no index from the host either
    batch = [t.cuda() for t in tiny_batch()]
    train_step(ctx, *batch, teacher_logits=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = train_step(ctx, *batch, teacher_logits=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["skipped"].item() == 0.0
