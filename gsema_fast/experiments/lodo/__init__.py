"""Leave-one-centre-out experiments: the paper's ablation rows, run for every unseen centre and seed, scored on whole
volumes, and tabulated with seed spread and paired bootstrap intervals."""

from gsema_fast.experiments.lodo.run import (
    ABLATION_ROWS,
    BASELINE_ROW,
    DETECTION,
    PAPER_TABLE1,
    PRESETS,
    RECORDS_FILE,
    TABLE_METRICS,
    Preset,
    lodo,
    paired_bootstrap,
    read_lodo_records,
    rebuild_lodo_table,
    write_lodo_table,
)

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
