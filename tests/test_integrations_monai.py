"""MONAI's ignite engines: the GS-EMA step as a SupervisedTrainer's iteration, the teacher evaluated through
LogitsOnly, and the documented recipe run as written (slow)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("ignite")

pytestmark = pytest.mark.integration

from ignite.engine import Events  # noqa: E402
from monai.engines import SupervisedEvaluator, SupervisedTrainer  # noqa: E402
from monai.handlers import MeanDice, from_engine  # noqa: E402
from monai.inferers import SimpleInferer  # noqa: E402
from monai.transforms import AsDiscreted  # noqa: E402
from tiny import make_ctx, tiny_batch  # noqa: E402

from gsema_fast.config import Config  # noqa: E402
from gsema_fast.data import TargetTransform  # noqa: E402
from gsema_fast.evaluation.metrics import case_metrics  # noqa: E402
from gsema_fast.integrations.monai import GSEMAIteration  # noqa: E402
from gsema_fast.models import LogitsOnly  # noqa: E402
from gsema_fast.step import train_step  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def batches(n: int = 4) -> list[dict]:
    torch.manual_seed(5)
    items = []
    for _ in range(n):
        x, y, _, _ = tiny_batch(batch=1)
        items.append({"image": x[0], "label": y[0]})
    return items


def transform() -> TargetTransform:
    return TargetTransform.from_config(Config().target_transform, seed=3)


@pytest.mark.slow
def test_the_iteration_is_the_package_step_inside_a_supervised_trainer():
    ctx = make_ctx()
    loader = DataLoader(batches(), batch_size=2)
    seen = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=ctx.student,
        optimizer=ctx.optimizer,
        loss_function=ctx.dce,
        iteration_update=GSEMAIteration(ctx, transform()),
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(dict(engine.state.output)))
    trainer.run()
    assert len(seen) == 4 and int(ctx.updater.step) == 4
    for key in ("image", "label", "loss", "total", "dce_student_src", "dce_student_trg", "bacl", "aligned", "grad_cos"):
        assert key in seen[0], key
    assert seen[-1]["loss"] is seen[-1]["total"]

    twin, twin_transform = make_ctx(), transform()  # the same four steps without the engine
    for _ in range(2):
        for batch in loader:
            x, y = batch["image"], batch["label"]
            train_step(twin, x, y, *twin_transform(x, y))
    assert int(twin.updater.num_aligned) == int(ctx.updater.num_aligned)
    for mine, theirs in ((ctx.student, twin.student), (ctx.teacher, twin.teacher)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_teacher_is_evaluated_through_logits_only():
    ctx = make_ctx()
    items = batches(2)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(items, batch_size=1),
        network=LogitsOnly(ctx.teacher),
        inferer=SimpleInferer(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[3, 3]),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    # MONAI's mean over cases and classes present, from the teacher's own logits
    teacher = copy.deepcopy(ctx.teacher).eval()
    per_case = []
    with torch.no_grad():
        for item in items:
            pred = teacher(item["image"][None])[0].argmax(1)[0]
            metrics = case_metrics(pred, item["label"][0], {"vessel": 1, "aneurysm": 2}, (1.0, 1.0, 1.0), hd95=False)
            per_case.append([metrics[name]["dice"] for name in ("vessel", "aneurysm")])
    want = torch.tensor(per_case).nanmean()
    assert evaluator.state.metrics["dice"] == pytest.approx(float(want), abs=1e-5)


def test_the_iteration_refuses_what_it_cannot_run():
    ctx = make_ctx()
    with pytest.raises(TypeError, match="StepContext"):
        GSEMAIteration(ctx.student, transform())
    with pytest.raises(TypeError, match="TargetTransform"):
        GSEMAIteration(ctx, lambda x, y: (x, y))
    with pytest.raises(ValueError, match="no batch"):
        GSEMAIteration(ctx, transform())(None, None)


@pytest.mark.slow
def test_the_documented_recipe_runs_as_written(tmp_path):
    import os
    import subprocess
    import sys

    blocks = [b.split("```", 1)[0] for b in DOCS.read_text().split("```python\n")[1:]]
    (script,) = [b for b in blocks if "GSEMAIteration(context" in b]
    (tmp_path / "script.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a user's machine
    done = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher Dice " in done.stdout and "updates 8" in done.stdout
    assert (tmp_path / "teacher.pt").is_file()
