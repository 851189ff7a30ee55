"""Leave-one-centre-out experiments: the paper's ablation rows (:mod:`~gsema_fast.experiments.lodo.study`) trained
for every unseen centre and seed and scored on whole volumes (:mod:`~gsema_fast.experiments.lodo.run`), and tabulated
(:mod:`~gsema_fast.experiments.lodo.report`) with seed spread and paired bootstrap intervals
(:mod:`~gsema_fast.experiments.lodo.stats`)."""

from gsema_fast.experiments.lodo.report import RECORDS_FILE, read_lodo_records, rebuild_lodo_table, write_lodo_table
from gsema_fast.experiments.lodo.run import lodo
from gsema_fast.experiments.lodo.stats import DETECTION, TABLE_METRICS, paired_bootstrap
from gsema_fast.experiments.lodo.study import ABLATION_ROWS, BASELINE_ROW, PAPER_TABLE1, PRESETS, Preset

__all__ = [
    "ABLATION_ROWS",
    "BASELINE_ROW",
    "DETECTION",
    "PAPER_TABLE1",
    "PRESETS",
    "RECORDS_FILE",
    "TABLE_METRICS",
    "Preset",
    "lodo",
    "paired_bootstrap",
    "read_lodo_records",
    "rebuild_lodo_table",
    "write_lodo_table",
]
