"""What a leave-one-centre-out study trains: the paper's ablation rows as overrides of a base config, the row every
effect is measured against, the paper's own figures for the rows that have a counterpart, and named presets."""

from __future__ import annotations

import dataclasses

from gsema_fast.config import Config, TargetTransformConfig

# The components of the simulated target domain T (config section target_transform).
_TARGET_COMPONENTS = tuple(TargetTransformConfig.model_fields)

# The paper's ablation rows (Table 1), a baseline that never sees the simulated target domain, and the paper's
# nnU-Net baseline, as overrides of the base config. Rows with BACL get loss.lambda_con from the base config (the
# paper's 0.5 if the base turns it off), see row_overrides.
ABLATION_ROWS: dict[str, tuple[str, ...]] = {
    "no EMA": ("ema.mode=none", "loss.lambda_con=0"),
    "EMA": ("ema.mode=ema", "loss.lambda_con=0"),
    "GS-EMA": ("ema.mode=gsema", "loss.lambda_con=0"),
    "GS-EMA + BACL-V": ("ema.mode=gsema", "bacl.volume=true", "bacl.boundary=false"),
    "GS-EMA + BACL-B": ("ema.mode=gsema", "bacl.volume=false", "bacl.boundary=true"),
    "GS-EMA + BACL": ("ema.mode=gsema", "bacl.volume=true", "bacl.boundary=true"),
    # T off: x_t = x_s, so the two supervised terms are one term counted twice (Adam is blind to the factor 2).
    "no EMA, no T": (
        "ema.mode=none",
        "loss.lambda_con=0",
        *(f"target_transform.{c}.enabled=false" for c in _TARGET_COMPONENTS),
    ),
    "DynUNet (nnU-Net-style)": (
        "model.name=dynunet",
        "model.checkpointing=false",
        "ema.mode=none",
        "loss.lambda_con=0",
    ),
}
# Every effect is a paired difference from this row.
BASELINE_ROW = "no EMA"
_PAPER_LAMBDA_CON = 0.5
# Table 1 of the paper (aneurysm, @neurIST, %, DSC / Sen / Jac / VS), for the rows that have a counterpart here.
PAPER_TABLE1: dict[str, tuple[float, float, float, float]] = {
    "no EMA": (61.52, 55.64, 50.91, 69.01),
    "EMA": (64.71, 62.86, 54.03, 72.64),
    "GS-EMA": (68.49, 72.79, 58.40, 76.63),
    "GS-EMA + BACL-V": (68.49, 72.79, 58.40, 76.63),
    "GS-EMA + BACL-B": (70.62, 75.14, 60.54, 78.22),
    "GS-EMA + BACL": (71.89, 70.88, 62.36, 80.00),
    "DynUNet (nnU-Net-style)": (59.61, 57.51, 47.38, 70.91),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named study: its rows, unseen centres (None: every centre), seeds, and config overrides applied first."""

    rows: tuple[str, ...]
    domains: tuple[str, ...] | None
    seeds: int
    overrides: tuple[str, ...] = ()
    note: str = ""


_METHOD_ROWS = tuple(r for r in ABLATION_ROWS if r != "DynUNet (nnU-Net-style)")
PRESETS: dict[str, Preset] = {
    # 7 rows x 3 seeds on the unseen centre D of the demo's phantoms, at the demo's network and patch size with a
    # quarter of its 4000 steps: about an hour on 2 CPU cores. Without the demo's test-time mirroring, whose 8 passes
    # per volume would take about as long again over 21 runs; every row is scored alike either way.
    "quick": Preset(
        rows=_METHOD_ROWS,
        domains=("3",),
        seeds=3,
        overrides=("train.epochs=2", "train.steps_per_epoch=500", "train.val_every=1", "eval.mirror_axes=[]"),
        note="CPU-sized: the demo config with 1000 steps per run, no test-time mirroring, unseen centre D only",
    ),
    # Every row, every centre, 5 seeds, at the config's own length (for a GPU: --config gpu).
    "full": Preset(rows=tuple(ABLATION_ROWS), domains=None, seeds=5, note="every row, every centre, 5 seeds"),
}


def slug(name: str) -> str:
    """A row's or a centre's folder name: lower case, words joined by hyphens ("GS-EMA + BACL": gs-ema-bacl)."""
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in name)
    return "-".join(part for part in out.split("-") if part)


def row_overrides(row: str, base: Config) -> tuple[str, ...]:
    """The overrides that make ``base`` an ablation row's config. The EMA row averages at the config's
    ``ema.decay_aligned``, GS-EMA's decay: the two rows then differ by the gate alone, as in the paper's table (with
    ``ema.decay``'s own default the EMA row would measure another horizon, not the gate)."""
    overrides = ABLATION_ROWS[row]
    if "ema.mode=ema" in overrides:
        overrides = (*overrides, f"ema.decay={base.ema.decay_aligned!r}")
    if "loss.lambda_con=0" not in overrides and base.loss.lambda_con == 0:
        overrides = (*overrides, f"loss.lambda_con={_PAPER_LAMBDA_CON}")
    return overrides
