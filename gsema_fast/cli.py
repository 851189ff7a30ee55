"""The ``gsema-fast`` command: parses arguments and calls importable functions (which the tests call too).

Each verb is a pair: ``_add_<verb>(subparsers)`` declares its arguments and ``_run_<verb>(args)`` calls the
library. Heavy imports happen inside ``_run_*`` so that ``gsema-fast --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("gsema_fast")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsema-fast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in _VERBS:
        add(sub)
    return parser


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic multi-centre 3DRA dataset (NIfTI, nnU-Net layout)")
    p.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--domains", type=int, default=4, help="number of centres (default 4)")
    p.add_argument("--cases-per-domain", type=int, default=6, help="cases per centre (default 6)")
    p.add_argument("--size", type=int, default=128, help="matrix size of the finest centre (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count for large datasets)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if the folder holds this dataset")
    p.set_defaults(run=_run_synth)


def _run_synth(args) -> int:
    from gsema_fast.data import synthesize

    out = synthesize(args.out, domains=args.domains, cases_per_domain=args.cases_per_domain, size=args.size,
                     seed=args.seed, workers=args.workers, overwrite=args.overwrite)
    log.info("dataset written: %s", out / "dataset.json")
    return 0


_VERBS: list = [_add_synth]


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
