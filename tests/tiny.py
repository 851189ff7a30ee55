"""A tiny UNet teacher-student pair and batches, shared by the step tests and the multi-process worker."""

from __future__ import annotations

import contextlib
import copy

import torch

from gsema_fast import ops
from gsema_fast.config import config_to_dict, load_config
from gsema_fast.ema import EMA, GSEMA
from gsema_fast.losses import BACL, DiceCE
from gsema_fast.models import build_model
from gsema_fast.step import StepContext

TINY_MODEL = {"name": "unet", "channels": [4, 8, 16], "num_res_units": 1}


def tiny_batch(size: int = 16, batch: int = 2):
    x_s = torch.randn(batch, 1, size, size, size)
    x_t = x_s + 0.3 * torch.randn_like(x_s)
    y = (x_s > 0.5).long() + (x_s > 1.5).long()
    return x_s, y, x_t, y.clone()


def make_ctx(
    mode: str = "gsema",
    *,
    rule: str = "dot",
    lr: float = 0.05,
    bacl: bool = True,
    decay: float = 0.5,
    world_size: int = 1,
):
    torch.manual_seed(1)
    student = build_model(**TINY_MODEL)
    if mode == "gsema":
        updater = GSEMA(student, decay_aligned=decay, decay_conflict=1.0, rule=rule, warmup=False)
        teacher = updater.teacher
    elif mode == "ema":
        updater = EMA(student, decay=decay, warmup=False)
        teacher = updater.module
    else:
        updater, teacher = None, copy.deepcopy(student)
    # Perturb the teacher so that an update is visible in every tensor.
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return StepContext(
        student=student,
        teacher=teacher,
        optimizer=torch.optim.SGD(student.parameters(), lr=lr, fused=True),
        mode=mode,
        updater=updater,
        dce=DiceCE(),
        bacl=BACL() if bacl else None,
        lambda_sup=0.25,
        lambda_con=0.5,
        world_size=world_size,
    )


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def tiny_run(phantoms, *, batch_size: int = 2) -> list[str]:
    """``--set`` overrides of the demo config for a four-step run on tiny phantoms."""
    return [
        f"data.root={phantoms}",
        "data.patch_size=[16,16,16]",
        f"data.batch_size={batch_size}",
        "data.val_per_domain=1",
        "model.name=unet",
        "model.channels=[4,8,16]",
        "train.epochs=2",
        "train.steps_per_epoch=2",
        "train.log_every=1",
        "train.val_every=1",
        "eval.overlap=0",
        "eval.mirror_axes=[]",  # the demo's eight passes per volume would only slow these runs; mirroring has its tests
    ]


@contextlib.contextmanager
def recorded_grad_stats():
    """While active, every ``ops.grad_stats`` result is also kept in the yielded dict under ``"stats"``."""
    seen = {}
    grad_stats = ops.grad_stats

    def spy(a, b, **kwargs):
        seen["stats"] = grad_stats(a, b, **kwargs)
        return seen["stats"]

    ops.grad_stats = spy
    try:
        yield seen
    finally:
        ops.grad_stats = grad_stats


# The settings of the session's phantoms (conftest)
SESSION_PHANTOMS = {"domains": 3, "cases_per_domain": 2, "size": 32, "seed": 0}


def tiny_checkpoint(path, overrides=()):
    """A checkpoint of an untrained tiny UNet (teacher and student alike, the same weights in every call) under the
    demo config with ``overrides``."""
    cfg = load_config(
        "demo",
        [
            "model.channels=[4,8,16]",
            "model.num_res_units=0",
            "data.patch_size=[16,16,16]",
            "eval.overlap=0",
            "eval.mirror_axes=[]",
            "data.val_per_domain=1",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    net = build_model(cfg.model)
    torch.save({"config": config_to_dict(cfg), "student": net.state_dict(), "teacher": net.state_dict()}, path)
    return path


def phantom_settings(folder):
    """The overrides that make a config's built-in phantoms the session's, synthesised into ``folder``."""
    return [
        "data.root=null",
        f"data.synth_dir={folder}",
        f"data.synth_domains={SESSION_PHANTOMS['domains']}",
        f"data.synth_cases_per_domain={SESSION_PHANTOMS['cases_per_domain']}",
        f"data.synth_size={SESSION_PHANTOMS['size']}",
        f"data.synth_seed={SESSION_PHANTOMS['seed']}",
    ]
