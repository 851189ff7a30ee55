"""Image and label MIPs of a few built-in phantom cases of every centre: ``python -m bench.phantom_figure``.

Writes ``bench/figures/phantoms.png`` (the figure in ``bench/RESULTS.md``) from the demo's built-in dataset.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from gsema_fast.config import load_config
from gsema_fast.data import dataset_folder, load_manifest
from gsema_fast.evaluation.figures import plot_dataset_mips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="config whose built-in dataset is drawn (default: demo)")
    parser.add_argument("--cases", type=int, default=2, help="cases per centre (default: 2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "figures" / "phantoms.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config)
    man = load_manifest(dataset_folder(cfg.data))
    rows = []
    for domain in man.domains:
        for case in man.cases_of(domain)[: args.cases]:
            image, label = nib.load(case.image), nib.load(case.label)
            rows.append(
                (
                    f"{case.name} (centre {domain})",
                    np.asarray(image.dataobj, np.float32),
                    np.asarray(label.dataobj),
                    image.affine,
                )
            )
    path = plot_dataset_mips(rows, man.labels, args.out, title=f"built-in phantoms ({args.config} config)")
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
