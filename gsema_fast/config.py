"""Run configuration: typed dataclasses filled from YAML, with ``--set a.b=c`` overrides.

A run is described by one :class:`Config`. :func:`load_config` reads a YAML file (or one of the shipped configs by
name: ``demo``, ``gpu``, ``paper``, ``reference``), applies ``--set`` overrides whose values are parsed as YAML
(``--set data.patch_size=[64,64,64]``, ``--set ema.mode=none``), checks every key and type, and validates the
values. Every error is a ``ValueError`` that names the full dotted key and the offending value, so that a typo
stops a run at once instead of hours later.

Fields that say ``auto`` (``train.device``, ``train.amp``, ``train.compile``) are resolved for the machine by
:func:`resolve_auto`; the trainer saves the resolved config in its run folder.

This module imports nothing heavier than PyYAML (torch only inside :func:`resolve_auto`), so the CLI can
validate a config before it loads torch or MONAI.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gsema_fast.files import atomic_path, require_file

log = logging.getLogger(__name__)

__all__ = [
    "Config",
    "DataConfig",
    "TargetTransformConfig",
    "ModelConfig",
    "LossConfig",
    "BaclConfig",
    "EmaConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "DATA_PATH_KEYS",
    "absolute_paths",
    "builtin_config_names",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "resolve_auto",
    "save_config",
    "validate_config",
    "validate_model_config",
    "with_overrides",
]

DEFAULT_CONFIG_NAME = "demo"
_CONFIG_PACKAGE = "gsema_fast.configs"

# SwinUNETR's patch embedding and four patch mergings halve the grid five times, and in training its deepest
# (1/32) stage must keep more than one voxel for instance norm.
SWIN_DIVISOR = 32
SWIN_MIN_SIZE = 64
# Past this width nnU-Net stops doubling; DynUNet and UNet channel lists derived from feature_size follow it.
MAX_DERIVED_CHANNELS = 320


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where the cases come from, how they are split by centre, and how patches are drawn (gsema_fast.data)."""

    # None: the built-in synthetic multi-centre phantoms, synthesised into ``synth_dir`` on first use.
    root: str | None = None
    # Another dataset.json instead of root/dataset.json, or a case-to-domain map (.json object or .csv with
    # case,domain) for an nnU-Net raw dataset whose dataset.json names no domains.
    manifest: str | None = None
    # Domains as named in the dataset (the built-in phantoms number theirs 0, 1, ...). None: all but test_domain.
    train_domains: list[str | int] | None = None
    # None: the last domain of the dataset.
    test_domain: str | int | None = None
    # One int means a cube. SwinUNETR needs multiples of 32 and at least 64.
    patch_size: int | list[int] = field(default_factory=lambda: [96, 96, 96])
    # Target voxel spacing in mm (one float means isotropic); None keeps each image's own grid.
    spacing: float | list[float] | None = None
    batch_size: int = 2
    # Patches per loaded volume; must divide batch_size.
    samples_per_volume: int = 1
    # Patch-centre sampling weights per label [background, vessel, aneurysm]; None: equal, which already
    # oversamples aneurysms (a tiny fraction of the voxels) enormously relative to uniform sampling.
    class_ratios: list[float] | None = None
    # Percentiles for the intensity clip before normalisation; None: no clip.
    clip_percentiles: list[float] | None = field(default_factory=lambda: [0.5, 99.5])
    intensity: Literal["zscore", "minmax", "none"] = "zscore"
    # Cases of each training domain held out for validation.
    val_per_domain: int = 1
    # Keep preprocessed volumes cached: in memory, or on disk in cache_dir when one is given (reused across runs).
    cache: bool = True
    cache_dir: str | None = None
    num_workers: int = 0
    # Built-in phantoms (used when root is None); synth_dir None: a per-user cache folder keyed by these settings.
    synth_dir: str | None = None
    synth_domains: int = 4
    synth_cases_per_domain: int = 6
    synth_size: int = 128
    synth_seed: int = 0


# The target-transform sections are the one home of the transform's components, their settings and defaults:
# gsema_fast.data.target derives its DEFAULTS and ORDER from TargetTransformConfig, and
# ``TargetTransform.from_config(cfg.target_transform, seed=...)`` builds the configured transform.
@dataclass
class GeometricConfig:
    """Rotation about the patch centre and scaling, image and label together (nearest neighbour for the label)."""

    enabled: bool = True
    p: float = 0.8
    # Largest rotation about each axis, either direction.
    rotate_deg: float = 15.0
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    # One scale factor for all three axes.
    isotropic: bool = True
    image_mode: Literal["bilinear", "nearest"] = "bilinear"


@dataclass
class GinConfig:
    """GIN random-convolution augmentation, mixed with the input by a random weight, rescaled to the input norm."""

    enabled: bool = True
    p: float = 0.5
    layers: int = 4
    channels: int = 2
    # Each layer draws its kernel size from this list.
    kernels: list[int] = field(default_factory=lambda: [1, 3])
    negative_slope: float = 0.01


@dataclass
class BiasConfig:
    """Smooth multiplicative bias field: exp of a random Legendre polynomial of degree ``order``."""

    enabled: bool = True
    p: float = 0.5
    order: int = 3
    coeff: float = 0.3


@dataclass
class IntensityConfig:
    """Gamma on the min-max normalised image, then contrast about the mean and a shift (in sample std units)."""

    enabled: bool = True
    p: float = 0.8
    gamma: list[float] = field(default_factory=lambda: [0.6, 1.6])
    contrast: list[float] = field(default_factory=lambda: [0.75, 1.25])
    shift: list[float] = field(default_factory=lambda: [-0.2, 0.2])


@dataclass
class HistogramConfig:
    """Random monotone piecewise-linear intensity map (histogram shift)."""

    enabled: bool = True
    p: float = 0.5
    control_points: list[int] = field(default_factory=lambda: [5, 12])


@dataclass
class SmoothConfig:
    """Gaussian blur, sigma in voxels."""

    enabled: bool = True
    p: float = 0.3
    sigma: list[float] = field(default_factory=lambda: [0.4, 1.5])


@dataclass
class NoiseConfig:
    """Additive Gaussian noise, std relative to the sample's standard deviation."""

    enabled: bool = True
    p: float = 0.5
    std: list[float] = field(default_factory=lambda: [0.02, 0.2])


@dataclass
class TargetTransformConfig:
    """The simulated target domain T(x, y) (paper Sec. 2.1); components run in this order, each with probability p."""

    geometric: GeometricConfig = field(default_factory=GeometricConfig)
    gin: GinConfig = field(default_factory=GinConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    histogram: HistogramConfig = field(default_factory=HistogramConfig)
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class ModelConfig:
    """The student/teacher network and where its latent is tapped (see gsema_fast.models)."""

    name: Literal["swinunetr", "dynunet", "unet"] = "swinunetr"
    in_channels: int = 1
    out_channels: int = 3
    # SwinUNETR embedding width (a multiple of 12); for dynunet/unet the first level's width when channels is None.
    feature_size: int = 24
    # encoderK is the encoder output K-1 halvings below the input grid, so encoder3 is the stride-4 map for every
    # network; SwinUNETR also offers its other block names, all networks offer "bottleneck".
    latent: str = "encoder3"
    # Gradient checkpointing of the Swin blocks (SwinUNETR only): less memory, about one more forward.
    checkpointing: bool = False
    dropout: float = 0.0
    # dynunet/unet: width of each resolution level, top first; None doubles feature_size per level (capped at 320).
    channels: list[int] | None = None
    # dynunet/unet: number of resolution levels including the bottleneck (used when channels is None).
    levels: int = 5
    # unet: residual units per block.
    num_res_units: int = 2
    # dynunet: residual conv blocks, as in nnU-Net's residual variant.
    res_block: bool = True


@dataclass
class LossConfig:
    """Total = lambda_sup * (student DCE terms [+ teacher DCE terms]) + lambda_con * BACL."""

    lambda_sup: float = 0.25
    lambda_con: float = 0.5
    # Dice over the whole batch instead of per sample (MONAI DiceCELoss(batch=True), nnU-Net's batch Dice): a patch
    # without an aneurysm then adds to the class's false positives instead of scoring each stray voxel as a total
    # failure, which keeps a rare class from being suppressed. The paper's default is per sample.
    batch_dice: bool = False
    # Compute the two teacher DCE terms. They carry no gradient (the teacher is never trained), so this only
    # decides whether they are logged, at the cost of two loss evaluations per step.
    teacher_terms: bool = True


@dataclass
class BaclConfig:
    """Boundary-aware contrastive loss on the latents of student and teacher, source and target."""

    volume: bool = True
    boundary: bool = True
    # Side of the zeroed low-frequency cube as a fraction of the latent size.
    cutoff: float = 0.5
    tau: float = 1.0
    # symmetric: centred cube, real rfft path; reference: the public code's fftshift mask, one bin asymmetric.
    mask: Literal["symmetric", "reference"] = "symmetric"
    # sample: mean over the batch of per-sample losses; batch_mean: one loss of the batch-mean similarities (the
    # public code averages the cosine similarities over the batch before exp/log).
    reduction: Literal["sample", "batch_mean"] = "sample"


@dataclass
class EmaConfig:
    """How the teacher follows the student."""

    # none: no averaging (the teacher mirrors the student); ema: plain EMA with ``decay``; gsema: gradient surgery.
    mode: Literal["none", "ema", "gsema"] = "gsema"
    # dot: aligned iff <g_src, g_trg> > 0 (angle < 90 degrees); sign: cosine of the sign vectors > 0.
    rule: Literal["dot", "sign"] = "dot"
    decay_aligned: float = 0.9
    # 1.0 leaves the teacher untouched on a conflicting step.
    decay_conflict: float = 1.0
    # Plain EMA (mode: ema).
    decay: float = 0.999
    # Early steps use min(decay, 1 - 1/(step + 1)) so the teacher is not stuck near its random start. Only a decay
    # below 1 is capped: decay_conflict 1.0 stays "no update".
    warmup: bool = True
    # The warm-up's step at the first update: 0 (first alpha 0, the teacher starts as the student); the public code
    # counts from 1 (first alpha 0.5).
    warmup_start: int = 0


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # SGD only.
    momentum: float = 0.99
    # step: lr *= gamma every step_every_epochs; cosine: to min_lr over the run; constant: no schedule.
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_every_epochs: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0


LoggerName = Literal["jsonl", "tensorboard"]


@dataclass
class TrainConfig:
    epochs: int = 100
    steps_per_epoch: int = 250
    # Stops the run early (after this many optimizer steps) whatever epochs says; None: no cap.
    max_steps: int | None = None
    # Validate every this many epochs (and after the last); 0: only after the last.
    val_every: int = 1
    # Also score the student on the validation cases (log.jsonl's "student_dice"): a teacher is worth having only
    # where it beats its student. Doubles the validation time; the teacher alone chooses best.pt either way.
    val_student: bool = False
    # GS-EMA: at each log record, the cosine of the source and target gradients in every layer of the student
    # ("layer_cos" in log.jsonl and TensorBoard, layer_agreement.png): where the target domain conflicts with the
    # source task. Computed on logging steps only, from the two gradient buffers already held apart.
    layer_agreement: bool = True
    # auto: bf16 on CUDA, fp32 on CPU (bf16 autocast of 3D convs on CPU is far slower than fp32).
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # auto: compile on CUDA only.
    compile: Literal["auto", True, False] = "auto"
    # Keep the compiled code between runs of the same model, shapes and device, so a second run starts warm;
    # compile_cache_dir None: a per-user cache folder.
    compile_cache: bool = True
    compile_cache_dir: str | None = None
    seed: int = 0
    # Deterministic algorithms (slower); needed for bit-exact resume.
    deterministic: bool = False
    out_dir: str = "runs/gsema"
    # Steps between log records (losses stay on the device in between).
    log_every: int = 10
    # Where the log records go: jsonl (log.jsonl, from which progress.png is drawn) and/or tensorboard (the folder
    # tensorboard/ in the run, needs the gsema-fast[tensorboard] extra).
    loggers: list[LoggerName] = field(default_factory=lambda: ["jsonl"])
    # Consecutive steps with a non-finite loss or gradient after which the run stops.
    max_nonfinite_steps: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On the CPU, keep freed memory in the process for reuse (see gsema_fast.memory): about 2x faster steps, while
    # the resident size stays at its peak.
    retain_cpu_memory: bool = True
    # Multi-process runs (torchrun): seconds any collective may wait for the other ranks before the job fails.
    dist_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    """Full-volume sliding-window inference, for validation and evaluation."""

    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: Literal["gaussian", "constant"] = "gaussian"
    weights: Literal["teacher", "student"] = "teacher"


@dataclass
class Config:
    """One run. Sections mirror the YAML files; ``note`` is a line the trainer shows when the run starts."""

    note: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    target_transform: TargetTransformConfig = field(default_factory=TargetTransformConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bacl: BaclConfig = field(default_factory=BaclConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate_config(self)


# ----------------------------------------------------------------------------------------------- YAML reading
class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float: YAML 1.1 demands a dot, so ``lr: 1e-3`` would be a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {err}") from None


# ------------------------------------------------------------------------------------------ typed conversion
_NO_MATCH = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        # Spelled as YAML spells them, so true/false rather than True/False.
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return getattr(tp, "__name__", str(tp))


def _match(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp`` (int -> float, tuple -> list), or ``_NO_MATCH``. Never bool for a number."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        return None if value is None else _NO_MATCH
    if origin is Literal:
        for allowed in typing.get_args(tp):
            # True == 1 in Python, so compare the type too.
            if value == allowed and type(value) is type(allowed):
                return value
        return _NO_MATCH
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            converted = _match(value, option)
            if converted is not _NO_MATCH:
                return converted
        return _NO_MATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        (item_type,) = typing.get_args(tp)
        items = [_match(item, item_type) for item in value]
        return _NO_MATCH if any(item is _NO_MATCH for item in items) else items
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO_MATCH
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    raise TypeError(f"config field type {tp!r} is not supported")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a section (mapping of keys), got {raw!r} ({type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown key '{dotted}'{hint}; {where} has: {', '.join(fields)}")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        tp = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build_section(tp, raw[name], dotted + ".")
            continue
        converted = _match(raw[name], tp)
        if converted is _NO_MATCH:
            value = raw[name]
            raise ValueError(f"{dotted}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[name] = converted
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> ``(["a", "b"], value)``, the value parsed as YAML (``x=`` gives None)."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not part for part in parts):
        raise ValueError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. data.batch_size=2")
    return parts, _parse_yaml(value_text, f"override {text!r}")


def _apply_override(raw: dict[str, Any], text: str) -> None:
    parts, value = parse_override(text)
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ValueError(f"override {text!r}: '{section}' is a value ({child!r}), not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        # A mapping given for a section merges into it rather than resetting its other keys.
        node[last] = _merge(node[last], value)
    else:
        node[last] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------------------------- public API
def builtin_config_names() -> list[str]:
    """Names of the shipped configs (``demo``, ``gpu``, ...), loadable as ``load_config(name)``."""
    folder = importlib.resources.files(_CONFIG_PACKAGE)
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _read_config_text(path: str | Path | None) -> tuple[str, str]:
    """(YAML text, a name for messages). A bare name that is not an existing file picks a shipped config."""
    if path is None:
        path = DEFAULT_CONFIG_NAME
    candidate = Path(path)
    is_bare_name = isinstance(path, str) and candidate.suffix == "" and len(candidate.parts) == 1
    if is_bare_name and not candidate.exists():
        names = builtin_config_names()
        if path not in names:
            raise FileNotFoundError(f"config {path!r}: no such file, and not a shipped config ({', '.join(names)})")
        resource = importlib.resources.files(_CONFIG_PACKAGE) / f"{path}.yaml"
        return resource.read_text(encoding="utf-8"), f"shipped config '{path}'"
    require_file(candidate, "config file")
    return candidate.read_text(encoding="utf-8"), str(candidate)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read, override, type-check and validate a config.

    ``path``: a YAML file, or the name of a shipped config (``demo``, ``gpu``, ``paper``, ``reference``);
    None means ``demo``. ``overrides``: ``"a.b=c"`` strings applied in order, values parsed as YAML.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the key for anything else.
    """
    text, source = _read_config_text(path)
    raw = _parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides)
    except ValueError as err:
        where = f"{source} with --set overrides" if overrides else source
        raise ValueError(f"{where}: {err}") from None


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a nested mapping (e.g. one stored in a checkpoint), then ``overrides``."""
    raw = _merge({}, copy.deepcopy(dict(data)))  # overrides edit nested sections in place: never the caller's
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text)
    return _build_section(Config, raw, "")


def with_overrides(cfg: Config, *overrides: str) -> Config:
    """A new validated :class:`Config` equal to ``cfg`` with ``"a.b=c"`` overrides applied in order: the syntax,
    YAML values and errors of ``--set``. ``cfg`` is left as it was; no overrides give an equal copy.

    Raises ``TypeError`` for a ``cfg`` that is not a Config or an override that is not a string, and ``ValueError``
    naming the dotted key for an unknown key or a bad value.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    for text in overrides:
        if not isinstance(text, str):
            raise TypeError(f"overrides must be 'a.b=c' strings, got {text!r} ({type(text).__name__})")
    return config_from_dict(config_to_dict(cfg), overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) that ``config_from_dict`` turns back into an equal config."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML, atomically (temp file + rename), so a crash never leaves half a config."""
    path = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# The settings that locate files of the dataset; a run stores them as absolute paths (absolute_paths).
DATA_PATH_KEYS = ("root", "manifest", "synth_dir", "cache_dir")


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose dataset paths (:data:`DATA_PATH_KEYS` of ``data``) are absolute (``~`` expanded,
    relative paths taken from the working directory), so that a stored config names the same files from anywhere."""
    paths = {
        key: os.path.abspath(os.path.expanduser(value))
        for key in DATA_PATH_KEYS
        if (value := getattr(cfg.data, key)) is not None
    }
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths))


def resolve_auto(cfg: Config, device: str | None = None) -> Config:
    """A copy of ``cfg`` with ``train.device``, ``train.amp`` and ``train.compile`` resolved for a device type.

    ``device``: ``"cpu"`` or ``"cuda"``; None uses ``train.device``, where ``auto`` means CUDA when available.
    auto amp is bf16 on CUDA and fp32 on CPU; auto compile is on for CUDA only.
    """
    requested = device or cfg.train.device
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device: expected one of 'auto', 'cpu', 'cuda', got {requested!r}")
    if requested in ("auto", "cuda"):
        import torch

        has_cuda = torch.cuda.is_available()
        if requested == "cuda" and not has_cuda:
            raise ValueError("train.device: 'cuda' was asked for but no CUDA device is available")
        requested = "cuda" if has_cuda else "cpu"
    on_cuda = requested == "cuda"
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if on_cuda else "fp32"
    elif amp != "fp32" and not on_cuda:
        log.warning("train.amp=%s on the CPU: 3D convolutions under CPU autocast are much slower than fp32", amp)
    compile_ = cfg.train.compile
    if compile_ == "auto":
        compile_ = on_cuda
    train = dataclasses.replace(cfg.train, device=requested, amp=amp, compile=compile_)
    return dataclasses.replace(cfg, train=train)


# -------------------------------------------------------------------------------------------------- validation
def _fail(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ValueError(f"{key}: {why}, got {value!r}")


def _check_range(key: str, value: Sequence[float], *, low: float | None = None, positive: bool = False) -> None:
    if len(value) != 2 or value[0] > value[1]:
        _fail(key, value, "expected [low, high] with low <= high")
    if positive and value[0] <= 0:
        _fail(key, value, "expected values > 0")
    if low is not None and value[0] < low:
        _fail(key, value, f"expected values >= {low}")


def _check_probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(key, value, "expected a probability in [0, 1]")


def _check_min(key: str, value: float | None, minimum: float) -> None:
    if value is not None and value < minimum:
        _fail(key, value, f"expected >= {minimum}")


def _normalise_data(data: DataConfig) -> None:
    if isinstance(data.patch_size, int):
        data.patch_size = [data.patch_size] * 3
    if isinstance(data.spacing, (int, float)):
        data.spacing = [float(data.spacing)] * 3


def _validate_data(cfg: Config) -> None:
    data, model = cfg.data, cfg.model
    _normalise_data(data)
    patch = data.patch_size
    if len(patch) != 3 or any(not isinstance(s, int) or s < 1 for s in patch):
        _fail("data.patch_size", patch, "expected three positive ints (or one int for a cube)")
    if model.name == "swinunetr":
        if any(s % SWIN_DIVISOR or s < SWIN_MIN_SIZE for s in patch):
            _fail(
                "data.patch_size",
                patch,
                f"SwinUNETR needs every entry divisible by {SWIN_DIVISOR} and at least {SWIN_MIN_SIZE}",
            )
    else:
        levels = _level_count(model)
        divisor = 2 ** (levels - 1)
        if any(s % divisor for s in patch):
            _fail("data.patch_size", patch, f"{model.name} with {levels} levels needs multiples of {divisor}")
    if data.spacing is not None and (len(data.spacing) != 3 or any(s <= 0 for s in data.spacing)):
        _fail("data.spacing", data.spacing, "expected three spacings > 0 in mm, one float, or null")
    for key in ("batch_size", "samples_per_volume", "synth_domains", "synth_cases_per_domain", "synth_size"):
        _check_min(f"data.{key}", getattr(data, key), 1)
    if data.batch_size % data.samples_per_volume:
        _fail("data.samples_per_volume", data.samples_per_volume, f"must divide data.batch_size = {data.batch_size}")
    _check_min("data.num_workers", data.num_workers, 0)
    _check_min("data.val_per_domain", data.val_per_domain, 0)
    ratios = data.class_ratios
    if ratios is not None and (len(ratios) != model.out_channels or min(ratios) < 0 or sum(ratios) <= 0):
        _fail(
            "data.class_ratios",
            ratios,
            f"expected {model.out_channels} non-negative weights (one per class, not all 0), or null",
        )
    clip = data.clip_percentiles
    if clip is not None and (len(clip) != 2 or not 0.0 <= clip[0] < clip[1] <= 100.0):
        _fail("data.clip_percentiles", clip, "expected [low, high] with 0 <= low < high <= 100, or null")
    if data.train_domains is not None:
        if not data.train_domains:
            _fail("data.train_domains", data.train_domains, "expected at least one domain, or null for all")
        # The data module compares domain names as strings: 3 and "3" are the same centre.
        if data.test_domain is not None and str(data.test_domain) in {str(d) for d in data.train_domains}:
            _fail("data.train_domains", data.train_domains, f"holds the test domain {data.test_domain!r}")
    if data.root is None and data.synth_domains < 2:
        _fail("data.synth_domains", data.synth_domains, "expected >= 2 (at least one to train on, one to test)")


def _level_count(model: ModelConfig) -> int:
    return len(model.channels) if model.channels is not None else model.levels


def _validate_target_transform(tt: TargetTransformConfig) -> None:
    prefix = "target_transform"
    for section in dataclasses.fields(tt):
        _check_probability(f"{prefix}.{section.name}.p", getattr(tt, section.name).p)
    _check_min(f"{prefix}.geometric.rotate_deg", tt.geometric.rotate_deg, 0.0)
    _check_range(f"{prefix}.geometric.scale", tt.geometric.scale, positive=True)
    _check_min(f"{prefix}.gin.layers", tt.gin.layers, 1)
    _check_min(f"{prefix}.gin.channels", tt.gin.channels, 1)
    kernels = tt.gin.kernels
    if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
        _fail(f"{prefix}.gin.kernels", kernels, "expected a non-empty list of odd kernel sizes (e.g. [1, 3])")
    _check_min(f"{prefix}.gin.negative_slope", tt.gin.negative_slope, 0.0)
    _check_min(f"{prefix}.bias.order", tt.bias.order, 1)
    _check_min(f"{prefix}.bias.coeff", tt.bias.coeff, 0.0)
    _check_range(f"{prefix}.intensity.gamma", tt.intensity.gamma, positive=True)
    _check_range(f"{prefix}.intensity.contrast", tt.intensity.contrast, positive=True)
    _check_range(f"{prefix}.intensity.shift", tt.intensity.shift)
    _check_range(f"{prefix}.histogram.control_points", tt.histogram.control_points, low=2)
    _check_range(f"{prefix}.smooth.sigma", tt.smooth.sigma, low=0.0)
    _check_range(f"{prefix}.noise.std", tt.noise.std, low=0.0)


def validate_model_config(model: ModelConfig) -> None:
    """Value checks of the ``model`` section alone (build_model uses it for models built without a Config)."""
    _check_min("model.in_channels", model.in_channels, 1)
    _check_min("model.out_channels", model.out_channels, 2)
    _check_min("model.feature_size", model.feature_size, 1)
    if model.name == "swinunetr" and model.feature_size % 12:
        _fail("model.feature_size", model.feature_size, "SwinUNETR needs a multiple of 12")
    if not 0.0 <= model.dropout < 1.0:
        _fail("model.dropout", model.dropout, "expected a rate in [0, 1)")
    if model.checkpointing and model.name != "swinunetr":
        _fail("model.checkpointing", model.checkpointing, "gradient checkpointing is implemented for swinunetr only")
    if model.channels is not None and (len(model.channels) < 3 or any(c < 1 for c in model.channels)):
        _fail("model.channels", model.channels, "expected at least 3 positive widths, or null")
    _check_min("model.levels", model.levels, 3)
    _check_min("model.num_res_units", model.num_res_units, 0)
    if not re.fullmatch(r"[a-z]+[0-9]*", model.latent):
        _fail("model.latent", model.latent, "expected a block name such as 'encoder3'")


def _validate_method(cfg: Config) -> None:
    _check_min("loss.lambda_sup", cfg.loss.lambda_sup, 0.0)
    _check_min("loss.lambda_con", cfg.loss.lambda_con, 0.0)
    if not 0.0 < cfg.bacl.cutoff < 1.0:
        _fail("bacl.cutoff", cfg.bacl.cutoff, "expected a fraction in (0, 1)")
    if not cfg.bacl.tau > 0.0:
        _fail("bacl.tau", cfg.bacl.tau, "expected a temperature > 0")
    for key in ("decay_aligned", "decay_conflict", "decay"):
        value = getattr(cfg.ema, key)
        if not 0.0 <= value <= 1.0:
            _fail(f"ema.{key}", value, "expected a decay in [0, 1]")
    _check_min("ema.warmup_start", cfg.ema.warmup_start, 0)


def _validate_optim_train_eval(cfg: Config) -> None:
    optim, train, evaluation = cfg.optim, cfg.train, cfg.eval
    if not optim.lr > 0.0:
        _fail("optim.lr", optim.lr, "expected a learning rate > 0")
    _check_min("optim.weight_decay", optim.weight_decay, 0.0)
    if not 0.0 <= optim.momentum < 1.0:
        _fail("optim.momentum", optim.momentum, "expected a value in [0, 1)")
    _check_min("optim.step_every_epochs", optim.step_every_epochs, 1)
    if not 0.0 < optim.gamma <= 1.0:
        _fail("optim.gamma", optim.gamma, "expected a factor in (0, 1]")
    if not 0.0 <= optim.min_lr <= optim.lr:
        _fail("optim.min_lr", optim.min_lr, f"expected a value in [0, optim.lr = {optim.lr}]")
    for key in ("epochs", "steps_per_epoch", "log_every", "max_nonfinite_steps"):
        _check_min(f"train.{key}", getattr(train, key), 1)
    _check_min("train.max_steps", train.max_steps, 1)
    _check_min("train.val_every", train.val_every, 0)
    _check_min("train.dist_timeout_s", train.dist_timeout_s, 1)
    if not train.out_dir:
        _fail("train.out_dir", train.out_dir, "expected a folder")
    known_loggers = list(typing.get_args(LoggerName))
    if any(name not in known_loggers for name in train.loggers) or len(set(train.loggers)) < len(train.loggers):
        _fail("train.loggers", train.loggers, f"expected each of {known_loggers} at most once")
    if not 0.0 <= evaluation.overlap < 1.0:
        _fail("eval.overlap", evaluation.overlap, "expected a fraction in [0, 1)")
    _check_min("eval.sw_batch_size", evaluation.sw_batch_size, 1)


def validate_config(cfg: Config) -> None:
    """Check values across the whole config; raises ``ValueError`` naming the dotted key and the bad value.

    Types are checked while reading YAML; this checks ranges, enums and the cross-section rules (patch size
    versus network). It also expands a single-int ``data.patch_size`` / single-float ``data.spacing`` to three.
    """
    _check_enums(cfg)
    validate_model_config(cfg.model)
    _validate_data(cfg)
    _validate_target_transform(cfg.target_transform)
    _validate_method(cfg)
    _validate_optim_train_eval(cfg)


def _check_enums(cfg: Config) -> None:
    """Literal fields re-checked here so that configs built in code (not from YAML) get the same message."""
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal and _match(getattr(section, f.name), tp) is _NO_MATCH:
                value = getattr(section, f.name)
                _fail(f"{section_field.name}.{f.name}", value, f"expected {_type_name(tp)}")
