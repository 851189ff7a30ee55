"""The ``gsema-fast`` command: parses arguments and calls importable functions (which the tests call too).

Each verb is a pair: ``_add_<verb>(subparsers)`` declares its arguments and ``_run_<verb>(args)`` calls the
library; :data:`_VERBS` lists the verbs, in the order ``--help`` shows them. An option that several verbs take is
declared once, as a parent parser below (its help names what it means for the verb that takes it). Heavy imports
happen inside ``_run_*`` so that ``gsema-fast --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("gsema_fast")

# ------------------------------------------------------------------------------------------------ shared options


def _option(*flags: str, **spec) -> argparse.ArgumentParser:
    """A parent parser (``parents=[...]``) holding one option."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **spec)
    return parent


def _config_file(help_text: str) -> argparse.ArgumentParser:
    return _option("--config", default=None, help=help_text)


def _overrides(help_text: str) -> argparse.ArgumentParser:
    return _option("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _out(help_text: str, *, required: bool = False) -> argparse.ArgumentParser:
    return _option("--out", required=required, default=None, help=help_text)


def _overwrite(help_text: str) -> argparse.ArgumentParser:
    return _option("--overwrite", action="store_true", help=help_text)


_CONFIG_OVERRIDES = _overrides(
    "config override, value parsed as YAML, e.g. --set data.patch_size=[64,64,64] (repeatable)"
)
# The config of a run: train and bench-step.
_RUN_CONFIG = [
    _config_file("YAML file or shipped config name (default: 'gpu' on a CUDA machine, else 'demo')"),
    _CONFIG_OVERRIDES,
]
_NPROC = _option(
    "--nproc",
    type=int,
    default=None,
    metavar="N",
    help="train in N processes on this machine (one per GPU; gloo on CPUs), as torchrun --standalone "
    "--nproc_per_node N -m gsema_fast train ... would; data.batch_size is then per process",
)
# A trained network run on whole volumes: evaluate and predict.
_INFERENCE = [
    _option("--checkpoint", required=True, help="checkpoint written by gsema-fast train"),
    _option(
        "--weights",
        choices=["teacher", "student"],
        default=None,
        help="network to run (default: the config's eval.weights, the teacher)",
    ),
    _config_file(
        "YAML file or shipped config name whose data and eval sections replace the checkpoint's (its model and "
        "preprocessing must agree)"
    ),
    _overrides(
        "inference setting, eval.* or train.amp (AMP on CUDA), applied last, e.g. --set eval.mode=constant (repeatable)"
    ),
    _option("--overlap", type=float, default=None, help="sliding-window overlap (default: eval.overlap)"),
    _option("--sw-batch-size", type=int, default=None, help="windows per forward (default: eval.sw_batch_size)"),
    _option("--device", default=None, help="cpu or cuda (default: cuda when available)"),
]


def _default_config_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "demo"


# ------------------------------------------------------------------------------------------------ the verbs


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        parents=[
            *_RUN_CONFIG,
            _out("run folder (overrides train.out_dir)"),
            _overwrite("replace the run in a run folder that holds one (refused without)"),
            _NPROC,
        ],
        help="train a GS-EMA teacher-student pair (built-in phantoms when given nothing)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <run folder>/checkpoints/latest.pt")
    p.set_defaults(run=_run_train)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` (however it was typed: ``--nproc=N``, ``--np N``, repeated), as argparse reads it."""
    return argparse.ArgumentParser(add_help=False, parents=[_NPROC]).parse_known_args(argv)[1]


def _run_train(args) -> int:
    from gsema_fast import distributed
    from gsema_fast.config import load_config
    from gsema_fast.training import train

    overrides = [*args.set, *([f"train.out_dir={args.out}"] if args.out else [])]
    cfg = load_config(args.config or _default_config_name(), overrides)  # a bad key is refused before any process
    if args.nproc is not None and not distributed.launched():
        code, message = distributed.launch(args.nproc, _without_nproc(args.argv), verbose=args.verbose)
        if message:  # the job's end, in the line one process would have written
            log.error("%s", message)
        return code
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        parents=[
            _out("output folder (imagesTr/, labelsTr/, dataset.json)", required=True),
            _overwrite(
                "regenerate even if the folder holds this dataset; replace another dataset in it (refused without)"
            ),
        ],
        help="write the synthetic multi-centre 3DRA dataset (NIfTI, nnU-Net layout)",
    )
    p.add_argument("--domains", type=int, default=4, help="number of centres (default 4)")
    p.add_argument("--cases-per-domain", type=int, default=6, help="cases per centre (default 6)")
    p.add_argument("--size", type=int, default=128, help="matrix size of the finest centre (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count for large datasets)")
    p.set_defaults(run=_run_synth)


def _run_synth(args) -> int:
    from gsema_fast.data import synthesize

    out = synthesize(
        args.out,
        domains=args.domains,
        cases_per_domain=args.cases_per_domain,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    log.info("dataset written: %s", out / "dataset.json")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[
            *_INFERENCE,
            _out("output folder (default: <run folder>/evaluation_<checkpoint name>)"),
            _overwrite(
                "replace the results of an earlier evaluation (or a training run's summary.json) in --out (refused "
                "without)"
            ),
        ],
        help="score a checkpoint on whole volumes (metrics per case, domain and overall)",
    )
    p.add_argument("--data", default=None, help="dataset folder (default: the one in the checkpoint's config)")
    p.add_argument(
        "--domain",
        action="append",
        default=None,
        help="centre to evaluate (repeatable; default: the checkpoint's unseen centre)",
    )
    p.add_argument(
        "--split",
        choices=["test", "val", "all"],
        default="test",
        help="test: the centre's cases; val: held-out cases of the training centres; all (default test)",
    )
    p.add_argument("--save-predictions", action="store_true", help="also write the label NIfTIs")
    p.add_argument("--no-hd95", action="store_true", help="skip the (slow on large volumes) surface distance")
    p.add_argument("--figures", action="store_true", help="MIP overlays per case and a t-SNE of teacher latents")
    p.add_argument(
        "--compare",
        nargs="+",
        default=(),
        metavar="CK",
        help="more checkpoints drawn as extra t-SNE panels (e.g. an EMA run beside a GS-EMA run)",
    )
    p.set_defaults(run=_run_evaluate)


def _inference_config(args):
    from gsema_fast.config import load_config

    return load_config(args.config) if args.config else None


def _run_evaluate(args) -> int:
    from gsema_fast.evaluation.evaluate import evaluate

    evaluate(
        args.checkpoint,
        args.data,
        domain=args.domain,
        split=args.split,
        weights=args.weights,
        out_dir=args.out,
        figures=args.figures,
        compare=args.compare,
        config=_inference_config(args),
        overrides=args.set,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        save_predictions=args.save_predictions,
        hd95=not args.no_hd95,
        overwrite=args.overwrite,
    )
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        parents=[*_INFERENCE, _overwrite("replace outputs already in --output (refused without)")],
        help="segment NIfTI files with a checkpoint (labels on each input's own grid)",
    )
    p.add_argument("--input", required=True, nargs="+", help="NIfTI file(s) and/or folder(s) of them")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz")
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from gsema_fast.inference import predict

    result = predict(
        args.checkpoint,
        args.input,
        args.output,
        probabilities=args.probabilities,
        weights=args.weights,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        config=_inference_config(args),
        overrides=args.set,
        overwrite=args.overwrite,
    )
    return 1 if result["failed"] else 0


def _add_lodo(sub) -> None:
    p = sub.add_parser(
        "lodo",
        parents=[
            _config_file("YAML file or shipped config name (default: demo)"),
            _CONFIG_OVERRIDES,
            _out("output folder (default: <train.out_dir>/lodo)"),
            _overwrite(
                "train again the runs in --out that were made with other settings (config, dataset, seed, --use); "
                "without it such a run is refused. Runs made with these settings are kept"
            ),
        ],
        help="leave-one-domain-out training and evaluation; --ablation for the paper's rows",
    )
    p.add_argument(
        "--preset",
        choices=["quick", "full"],
        default=None,
        help="a whole study: quick (7 rows x 3 seeds on unseen centre D, ~60 min on 2 CPU cores) or full (every "
        "row, every centre, 5 seeds; for a GPU); --row, --domain and --seeds given too win",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per centre (default: the preset's, else 1)")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="no EMA, EMA, GS-EMA, + BACL-V, + BACL-B, + BACL, no EMA without T, and the DynUNet baseline",
    )
    p.add_argument("--row", action="append", default=None, help="only this ablation row (repeatable)")
    p.add_argument("--domain", action="append", default=None, help="only this unseen centre (repeatable)")
    p.add_argument(
        "--use",
        choices=["final", "best"],
        default="best",
        help="checkpoint to evaluate (default best: chosen on held-out cases of the training centres)",
    )
    p.set_defaults(run=_run_lodo)


def _run_lodo(args) -> int:
    from gsema_fast.experiments.lodo import lodo

    result = lodo(
        args.config,
        preset=args.preset,
        seeds=args.seeds,
        ablation=args.ablation,
        rows=args.row,
        domains=args.domain,
        out_dir=args.out,
        overrides=args.set,
        checkpoint=args.use,
        overwrite=args.overwrite,
    )
    log.info("results: %s", result["tables"]["markdown"])
    return 0


def _add_lodo_table(sub) -> None:
    p = sub.add_parser(
        "lodo-table",
        parents=[_out("folder for lodo_table.md, lodo_table.csv, lodo_effects.csv, ...", required=True)],
        help="write lodo's tables again from the lodo_records.json of a study (no training)",
    )
    p.add_argument("records", help="a lodo_records.json, as lodo writes it into its --out folder")
    p.set_defaults(run=_run_lodo_table)


def _run_lodo_table(args) -> int:
    from gsema_fast.experiments.lodo import rebuild_lodo_table

    tables = rebuild_lodo_table(args.records, args.out)
    log.info("results: %s", tables["markdown"])
    return 0


def _add_bench_step(sub) -> None:
    p = sub.add_parser(
        "bench-step",
        parents=[*_RUN_CONFIG, _out("also write the JSON to this file")],
        help="time a plain step, the reference GS-EMA step and ours; prints JSON",
    )
    p.add_argument(
        "--mode",
        choices=["plain", "reference", "gsema", "all"],
        default="all",
        help="which step to time; all: every mode in one process, with ratios to plain (default)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, compilation included (default 2)")
    p.add_argument(
        "--no-loader", action="store_true", help="do not time the dataset's training loader (no dataset needed)"
    )
    p.set_defaults(run=_run_bench_step)


def _run_bench_step(args) -> int:
    import json

    from gsema_fast.config import load_config
    from gsema_fast.files import atomic_path, require_writable_file
    from gsema_fast.training.benchstep import MODES, bench_step

    cfg = load_config(args.config or _default_config_name(), args.set)
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.out:  # found now, not after the whole benchmark has run
        require_writable_file(args.out, "--out")
    text = json.dumps(bench_step(cfg, modes, steps=args.steps, warmup=args.warmup, loader=not args.no_loader), indent=1)
    sys.stdout.write(text + "\n")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    return 0


def _add_nnunet_train(sub) -> None:
    p = sub.add_parser(
        "nnunet-train",
        parents=[
            _overwrite("replace the run in the trainer's fold folder (refused without)"),
            _overrides(
                "GS-EMA setting on top of the trainer's: ema.*, loss.*, bacl.*, target_transform.*, train.seed "
                "(repeatable; saved with the run)"
            ),
        ],
        help="train nnU-Net v2 with GS-EMA (nnUNetTrainerGSEMA or a variant; needs gsema-fast[nnunet])",
        description="nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerGSEMA, with nnU-Net's options; "
        "the nnUNet_raw, nnUNet_preprocessed and nnUNet_results variables as nnU-Net reads them. A run never "
        "replaces another: --c continues it, another trainer name (-tr) trains beside it, --overwrite replaces it.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset id or DatasetXXX_Name (planned and preprocessed)")
    p.add_argument("configuration", metavar="CONFIGURATION", help="a 3D configuration of the plans, e.g. 3d_fullres")
    p.add_argument("fold", metavar="FOLD", help="fold number or 'all'")
    p.add_argument(
        "-tr",
        dest="trainer",
        default="nnUNetTrainerGSEMA",
        help="GS-EMA trainer: nnUNetTrainerGSEMA (default), a variant of gsema-fast's (nnUNetTrainerGSEMA_sign, "
        "_noBACL, _5epochs) or your own subclass, found as nnUNetv2_train finds trainers; each trains into its own "
        "results folder",
    )
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-pretrained_weights", default=None, help="nnU-Net checkpoint to start student and teacher from")
    p.add_argument("-device", default="cuda", help="cuda, cpu or mps (default cuda)")
    p.add_argument("--npz", action="store_true", help="also save the final validation's softmax outputs")
    p.add_argument(
        "--c",
        action="store_true",
        help="continue from the latest checkpoint, with the run's own --set, epochs and iterations (GS-EMA state "
        "included); more --epochs extend it",
    )
    p.add_argument(
        "--val", action="store_true", help="only run the final validation of the finished run (no settings needed)"
    )
    p.add_argument("--val_best", action="store_true", help="validate checkpoint_best instead of checkpoint_final")
    p.add_argument("--disable_checkpointing", action="store_true", help="write no checkpoints")
    p.add_argument("--epochs", type=int, default=None, help="nnU-Net's num_epochs (default: the trainer's, 1000)")
    p.add_argument(
        "--iterations", type=int, default=None, help="training iterations per epoch (default: the trainer's, 250)"
    )
    p.add_argument(
        "--val-iterations", type=int, default=None, help="validation iterations per epoch (default: the trainer's, 50)"
    )
    p.set_defaults(run=_run_nnunet_train)


def _run_nnunet_train(args) -> int:
    from gsema_fast.integrations.nnunet import run_training

    run_training(
        args.dataset,
        args.configuration,
        args.fold,
        trainer_class=args.trainer,
        plans_identifier=args.plans,
        pretrained_weights=args.pretrained_weights,
        export_validation_probabilities=args.npz,
        continue_training=args.c,
        only_run_validation=args.val,
        disable_checkpointing=args.disable_checkpointing,
        val_with_best=args.val_best,
        device=args.device,
        overrides=args.set,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations,
        val_iterations_per_epoch=args.val_iterations,
        overwrite=args.overwrite,
    )
    return 0


def _add_nnunet_trainers(sub) -> None:
    p = sub.add_parser(
        "nnunet-trainers",
        parents=[_overwrite("replace another file of the same name (refused without)")],
        help="write the file through which nnUNetv2_train finds gsema-fast's trainers (nnUNet_extTrainer)",
        description="Writes FOLDER/gsema_fast_trainers.py, which imports nnUNetTrainerGSEMA and its variants; with "
        "nnUNet_extTrainer=FOLDER, nnU-Net 2.8 or later finds them by name (nnUNetv2_train ... -tr NAME).",
    )
    p.add_argument("folder", metavar="FOLDER", help="folder for nnUNet_extTrainer (created if missing)")
    p.set_defaults(run=_run_nnunet_trainers)


def _run_nnunet_trainers(args) -> int:
    from gsema_fast.integrations.nnunet import EXT_TRAINER, TRAINERS, ext_trainer_supported, write_trainer_file

    path = write_trainer_file(args.folder, overwrite=args.overwrite)
    log.info("wrote %s (%s)", path, ", ".join(cls.__name__ for cls in TRAINERS))
    if not ext_trainer_supported():
        log.warning(
            "this nnU-Net looks for trainers in its own package only (nnUNet_extTrainer needs nnU-Net 2.8): copy %s "
            "into nnunetv2/training/nnUNetTrainer/variants/ instead",
            path,
        )
    log.info("export %s=%s", EXT_TRAINER, path.parent.resolve())
    return 0


# Every verb, in the order `gsema-fast --help` lists them.
_VERBS = (
    _add_train,
    _add_synth,
    _add_evaluate,
    _add_predict,
    _add_lodo,
    _add_lodo_table,
    _add_bench_step,
    _add_nnunet_train,
    _add_nnunet_trainers,
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsema-fast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in _VERBS:
        add(sub)
    return parser


# ------------------------------------------------------------------------------------------------ running a verb


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser().parse_args(argv)
    args.argv = argv  # the command line as given: `train --nproc` runs it again in every process
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun: only rank 0 reports progress, the others problems
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s "
        + (f"[rank {rank}] " if "RANK" in os.environ else "")
        + "%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    previous = _terminate_as_interrupt()
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, OSError) as err:
        # Bad input, a refused folder or file, an output that cannot be written (read-only, disk full): one line
        # naming the file or key and the cause; the traceback only with --verbose.
        log.debug("details", exc_info=True)
        return _ended(2, "error", _one_line(err))
    except KeyboardInterrupt as err:
        return _ended(130, "interrupted", _one_line(err) if str(err) else "interrupted")
    except Exception as err:
        if "RANK" not in os.environ:
            raise
        from gsema_fast import distributed

        if distributed.lost_peer(err):  # the cause is another rank's, which says so
            log.debug("details", exc_info=True)
            return _ended(1, "peer", f"lost contact with the other ranks ({_one_line(err)})")
        distributed.report_outcome(1, "crash", _one_line(err))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt():
    """SIGTERM (``kill``, a scheduler's stop, torchrun stopping its ranks) ends a command as Ctrl-C does: a training
    stops after the step in flight, every command with exit code 130 and one line, instead of dying silently (143).
    Returns the handler it replaced (None when it left SIGTERM alone: not the main thread, or SIGTERM ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return None
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return previous


def _ended(code: int, kind: str, message: str) -> int:
    """Report how the command ended: in a rank started by ``train --nproc``, to the launcher, which says it once for
    the job; elsewhere in one log line (under plain torchrun, an interruption is said by rank 0 alone: every rank
    stops at the same step with the same message)."""
    if "RANK" in os.environ:
        from gsema_fast import distributed

        if distributed.report_outcome(code, kind, message):
            log.debug("%s", message)
            return code
    if kind == "interrupted" and os.environ.get("RANK", "0") != "0":
        log.info("%s", message)
    elif kind == "peer":
        log.warning("%s", message)
    else:
        log.error("%s", message)
    return code


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:  # the system's "[Errno 2] ..." without the code
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
