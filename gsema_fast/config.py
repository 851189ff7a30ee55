"""Run configuration: frozen pydantic models filled from YAML, with ``--set a.b=c`` overrides.

A run is described by one :class:`Config`, whose sections (:class:`DataConfig`, :class:`ModelConfig`, ...) hold every
setting with its type, range and default; the rules that tie settings together (the patch size a network needs, a
batch made of whole volumes' samples) are the models' validators. They are checked wherever a config is made: read
from YAML by :func:`load_config` (a file, or a shipped config by name: ``demo``, ``gpu``, ``paper``, ``reference``),
rebuilt from a checkpoint's dict by :func:`config_from_dict`, changed by :func:`with_overrides` (``--set`` strings,
values parsed as YAML) or :func:`replace`, or built in code (``Config(ema=EmaConfig(mode="ema"))``). Every error is
one line, a ``ValueError`` (:class:`ConfigError`), naming the dotted key and the offending value. Configs are
immutable: a changed one is a new, validated copy.

:class:`BaclOptions`, the ``bacl`` section, is also the options object of every BACL function and module
(``gsema_fast.ops.bacl_loss`` and the others), so that the loss's six options and their checks live here once.

Fields that say ``auto`` (``train.device``, ``train.amp``, ``train.compile``) are resolved for the machine by
:func:`resolve_auto` (devices by :func:`resolve_device`, autocast types by :func:`resolve_amp`, which code outside
a config uses too); the trainer saves the resolved config in its run folder.

This module imports nothing heavier than PyYAML and pydantic (torch only inside :func:`resolve_device`), so the CLI
can validate a config before it loads torch or MONAI.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from gsema_fast.files import atomic_path, require_file

log = logging.getLogger(__name__)

__all__ = [
    "AmpMode",
    "BaclMask",
    "BaclOptions",
    "BaclReduction",
    "Config",
    "ConfigError",
    "DataConfig",
    "EmaConfig",
    "EmaMode",
    "EmaRule",
    "EvalConfig",
    "EvalWeights",
    "IntensityMode",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "Postprocess",
    "TargetTransformConfig",
    "TrainConfig",
    "DATA_PATH_KEYS",
    "absolute_paths",
    "builtin_config_names",
    "check_choice",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "replace",
    "resolve_amp",
    "resolve_auto",
    "resolve_device",
    "save_config",
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

# The choices of the enumerated settings, each in one place; code that takes one of them as an argument checks it
# against these (``typing.get_args``).
IntensityMode = Literal["zscore", "minmax", "none"]
ModelName = Literal["swinunetr", "dynunet", "unet"]
BaclMask = Literal["symmetric", "reference"]
BaclReduction = Literal["sample", "batch_mean"]
EmaMode = Literal["none", "ema", "gsema"]
EmaRule = Literal["dot", "sign"]
AmpMode = Literal["auto", "bf16", "fp16", "fp32"]
DeviceName = Literal["auto", "cpu", "cuda"]
LoggerName = Literal["jsonl", "tensorboard"]
EvalWeights = Literal["teacher", "student"]


def check_choice(name: str, value: Any, choices: Any) -> None:
    """For code that takes one of these choices as an argument: a ``ValueError`` naming ``name`` unless ``value`` is
    one of the Literal ``choices`` (``check_choice("rule", rule, EmaRule)``)."""
    allowed = typing.get_args(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


class ConfigError(ValueError):
    """A setting that is not valid: one line naming the dotted key, what was expected and the value given.

    ``key``: the dotted key; ``expected``: what the setting takes, in words (empty for a rule across settings);
    ``given``: the value; ``note``: its type where the type was wrong; ``unknown``: the key is not a setting."""

    def __init__(
        self, message: str, *, key: str = "", expected: str = "", given: Any = None, note: str = "", unknown=False
    ) -> None:
        super().__init__(message)
        self.key, self.expected, self.given, self.note, self.unknown = key, expected, given, note, unknown


# ------------------------------------------------------------------------------------------------- value types
def _cube(value: Any) -> Any:
    """One number stands for the same value on all three axes."""
    return [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _ordered(value: list) -> list:
    if value[0] > value[1]:
        raise ValueError("expected [low, high] with low <= high")
    return value


def _strictly_ordered(value: list) -> list:
    if value[0] >= value[1]:
        raise ValueError("expected [low, high] with low < high")
    return value


def _each_once(value: list) -> list:
    # Domains are compared as the data module compares them, as strings: 3 and "3" are the same centre.
    names = [str(v) for v in value]
    if len(set(names)) < len(names):
        raise ValueError("expected each entry at most once")
    return value


def _not_all_zero(value: list) -> list:
    if sum(value) <= 0:
        raise ValueError("expected weights that are not all 0")
    return value


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("expected odd kernel sizes (e.g. [1, 3])")
    return value


def _block_name(value: str) -> str:
    if not re.fullmatch(r"[a-z]+[0-9]*", value):
        raise ValueError("expected a block name such as 'encoder3'")
    return value


Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]  # probabilities and decays
Triple = Field(min_length=3, max_length=3)
Pair = Field(min_length=2, max_length=2)
PositiveRange = Annotated[list[Positive], Pair, AfterValidator(_ordered)]
NonNegativeRange = Annotated[list[NonNegative], Pair, AfterValidator(_ordered)]
Range = Annotated[list[float], Pair, AfterValidator(_ordered)]


# ---------------------------------------------------------------------------------------------------- sections
class _Section(BaseModel):
    """A config section: unknown keys refused, types strict (an int is no bool, a float no int; an int is read as a
    float where a float is expected), numbers finite, values immutable, and every error one line naming the key."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    # pydantic builds nested sections through their __init__ too, so a section's error is described (with its place
    # in a Config) where it arises, and the sections around it pass it on.
    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _describe(err, type(self), data) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise _describe(err, cls, obj) from None

    @model_validator(mode="before")
    @classmethod
    def _plain_inputs(cls, data: Any) -> Any:
        # Code passes tuples and paths where YAML gives lists and strings; a section left empty in YAML is null.
        if not isinstance(data, Mapping):
            return data
        out = {}
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif value is None and field is not None and _section_type(field.annotation) is not None:
                value = {}
            out[key] = value
        return out


class SmallComponents(_Section):
    """Patch centres on the small connected components of one class (``data.small_components``): in a case whose
    label holds components of class ``label`` smaller than ``below_mm3``, their voxels are one more choice of patch
    centre, drawn with weight ``ratio`` beside ``data.class_ratios``' weights. Small sacs are the ones a model misses;
    this shows them to it more often without showing the large ones more. Components are 26-connected and measured on
    the training grid; a case without a small component draws its patches as ``data.class_ratios`` says."""

    # 0: off.
    ratio: NonNegative = 0.0
    # The label value whose components count (2: aneurysm in the built-in phantoms).
    label: NonNegativeInt = 2
    below_mm3: Positive = 50.0


class DataConfig(_Section):
    """Where the cases come from, how they are split by centre, and how patches are drawn (gsema_fast.data)."""

    # None: the built-in synthetic multi-centre phantoms, synthesised into ``synth_dir`` on first use.
    root: str | None = None
    # Another dataset.json instead of root/dataset.json, or a case-to-domain map (.json object or .csv with
    # case,domain) for an nnU-Net raw dataset whose dataset.json names no domains.
    manifest: str | None = None
    # Domains as named in the dataset (the built-in phantoms number theirs 0, 1, ...). None: all but test_domain.
    train_domains: Annotated[list[str | int], Field(min_length=1), AfterValidator(_each_once)] | None = None
    # None: the last domain of the dataset.
    test_domain: str | int | None = None
    # One int means a cube. SwinUNETR needs multiples of 32 and at least 64.
    patch_size: Annotated[list[Count], BeforeValidator(_cube), Triple] = [96, 96, 96]
    # Target voxel spacing in mm (one float means isotropic); None keeps each image's own grid.
    spacing: Annotated[list[Positive], BeforeValidator(_cube), Triple] | None = None
    batch_size: Count = 2
    # Patches per loaded volume; must divide batch_size.
    samples_per_volume: Count = 1
    # Patch-centre sampling weights per label [background, vessel, aneurysm]; None: equal, which already
    # oversamples aneurysms (a tiny fraction of the voxels) enormously relative to uniform sampling.
    class_ratios: Annotated[list[NonNegative], Field(min_length=1), AfterValidator(_not_all_zero)] | None = None
    small_components: SmallComponents = Field(default_factory=SmallComponents)
    # Percentiles for the intensity clip before normalisation; None: no clip.
    clip_percentiles: (
        Annotated[list[Annotated[float, Field(ge=0.0, le=100.0)]], Pair, AfterValidator(_strictly_ordered)] | None
    ) = [0.5, 99.5]
    intensity: IntensityMode = "zscore"
    # Cases of each training domain held out for validation.
    val_per_domain: NonNegativeInt = 1
    # Keep preprocessed volumes cached: in memory, or on disk in cache_dir when one is given (reused across runs).
    cache: bool = True
    cache_dir: str | None = None
    num_workers: NonNegativeInt = 0
    # Built-in phantoms (used when root is None); synth_dir None: a per-user cache folder keyed by these settings.
    synth_dir: str | None = None
    synth_domains: Count = 4
    synth_cases_per_domain: Count = 6
    synth_size: Count = 128
    synth_seed: int = 0

    @model_validator(mode="after")
    def _split_and_batch(self) -> DataConfig:
        if self.batch_size % self.samples_per_volume:
            raise _SettingError(
                "samples_per_volume", self.samples_per_volume, f"must divide data.batch_size = {self.batch_size}"
            )
        if self.test_domain is not None and self.train_domains is not None:
            if str(self.test_domain) in {str(d) for d in self.train_domains}:
                raise _SettingError("train_domains", self.train_domains, f"holds the test domain {self.test_domain!r}")
        if self.root is None and self.synth_domains < 2:
            raise _SettingError(
                "synth_domains", self.synth_domains, "expected >= 2 (at least one to train on, one to test)"
            )
        return self


# The target-transform sections are the one home of the transform's components, their settings and defaults:
# gsema_fast.data.target derives its DEFAULTS and ORDER from TargetTransformConfig, and
# ``TargetTransform.from_config(cfg.target_transform, seed=...)`` builds the configured transform.
class GeometricConfig(_Section):
    """Rotation about the patch centre and scaling, image and label together (nearest neighbour for the label)."""

    enabled: bool = True
    p: UnitInterval = 0.8
    # Largest rotation about each axis, either direction.
    rotate_deg: NonNegative = 15.0
    scale: PositiveRange = [0.85, 1.15]
    # One scale factor for all three axes.
    isotropic: bool = True
    image_mode: Literal["bilinear", "nearest"] = "bilinear"


class GinConfig(_Section):
    """GIN random-convolution augmentation, mixed with the input by a random weight, rescaled to the input norm."""

    enabled: bool = True
    p: UnitInterval = 0.5
    layers: Count = 4
    channels: Count = 2
    # Each layer draws its kernel size from this list.
    kernels: Annotated[list[Annotated[int, Field(ge=1), AfterValidator(_odd)]], Field(min_length=1)] = [1, 3]
    negative_slope: NonNegative = 0.01


class BiasConfig(_Section):
    """Smooth multiplicative bias field: exp of a random Legendre polynomial of degree ``order``."""

    enabled: bool = True
    p: UnitInterval = 0.5
    order: Count = 3
    coeff: NonNegative = 0.3


class IntensityConfig(_Section):
    """Gamma on the min-max normalised image, then contrast about the mean and a shift (in sample std units)."""

    enabled: bool = True
    p: UnitInterval = 0.8
    gamma: PositiveRange = [0.6, 1.6]
    contrast: PositiveRange = [0.75, 1.25]
    shift: Range = [-0.2, 0.2]


class HistogramConfig(_Section):
    """Random monotone piecewise-linear intensity map (histogram shift)."""

    enabled: bool = True
    p: UnitInterval = 0.5
    control_points: Annotated[list[Annotated[int, Field(ge=2)]], Pair, AfterValidator(_ordered)] = [5, 12]


class SmoothConfig(_Section):
    """Gaussian blur, sigma in voxels."""

    enabled: bool = True
    p: UnitInterval = 0.3
    sigma: NonNegativeRange = [0.4, 1.5]


class NoiseConfig(_Section):
    """Additive Gaussian noise, std relative to the sample's standard deviation."""

    enabled: bool = True
    p: UnitInterval = 0.5
    std: NonNegativeRange = [0.02, 0.2]


class TargetTransformConfig(_Section):
    """The simulated target domain T(x, y) (paper Sec. 2.1); components run in this order, each with probability p."""

    geometric: GeometricConfig = Field(default_factory=GeometricConfig)
    gin: GinConfig = Field(default_factory=GinConfig)
    bias: BiasConfig = Field(default_factory=BiasConfig)
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    histogram: HistogramConfig = Field(default_factory=HistogramConfig)
    smooth: SmoothConfig = Field(default_factory=SmoothConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)


class ModelConfig(_Section):
    """The student/teacher network and where its latent is tapped (see gsema_fast.models)."""

    name: ModelName = "swinunetr"
    in_channels: Count = 1
    out_channels: int = Field(3, ge=2)
    # SwinUNETR embedding width (a multiple of 12); for dynunet/unet the first level's width when channels is None.
    feature_size: Count = 24
    # encoderK is the encoder output K-1 halvings below the input grid, so encoder3 is the stride-4 map for every
    # network; SwinUNETR also offers its other block names, all networks offer "bottleneck".
    latent: Annotated[str, AfterValidator(_block_name)] = "encoder3"
    # Gradient checkpointing of the Swin blocks (SwinUNETR only): less memory, about one more forward.
    checkpointing: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # dynunet/unet: width of each resolution level, top first; None doubles feature_size per level (capped at 320).
    channels: Annotated[list[Count], Field(min_length=3)] | None = None
    # dynunet/unet: number of resolution levels including the bottleneck (used when channels is None).
    levels: int = Field(5, ge=3)
    # unet: residual units per block.
    num_res_units: NonNegativeInt = 2
    # dynunet: residual conv blocks, as in nnU-Net's residual variant.
    res_block: bool = True

    @property
    def level_count(self) -> int:
        """Resolution levels of a dynunet/unet, the bottleneck included."""
        return len(self.channels) if self.channels is not None else self.levels

    @model_validator(mode="after")
    def _fits_the_network(self) -> ModelConfig:
        if self.name == "swinunetr" and self.feature_size % 12:
            raise _SettingError("feature_size", self.feature_size, "SwinUNETR needs a multiple of 12")
        if self.checkpointing and self.name != "swinunetr":
            raise _SettingError(
                "checkpointing", self.checkpointing, "gradient checkpointing is implemented for swinunetr only"
            )
        return self


class LossConfig(_Section):
    """Total = lambda_sup * (student DCE terms [+ teacher DCE terms]) + lambda_con * BACL."""

    lambda_sup: NonNegative = 0.25
    lambda_con: NonNegative = 0.5
    # Dice over the whole batch instead of per sample (MONAI DiceCELoss(batch=True), nnU-Net's batch Dice): a patch
    # without an aneurysm then adds to the class's false positives instead of scoring each stray voxel as a total
    # failure, which keeps a rare class from being suppressed. The paper's default is per sample.
    batch_dice: bool = False
    # Compute the two teacher DCE terms. They carry no gradient (the teacher is never trained), so this only
    # decides whether they are logged, at the cost of two loss evaluations per step.
    teacher_terms: bool = True
    # A recall term for rare classes (label values, as in data.class_ratios), weighted recall_weight (0: off): for each
    # listed class, the mean cross-entropy over a patch's voxels of that class, averaged over the patches that hold
    # it. Dice + CE's cross-entropy is a mean over every voxel, where a 20-voxel sac weighs a hundredth of a
    # 2000-voxel one; here a missed small sac costs as much as a missed large one.
    recall_weight: NonNegative = 0.0
    recall_classes: Annotated[list[Annotated[int, Field(ge=1)]], AfterValidator(_each_once)] = [2]


class BaclOptions(_Section):
    """Boundary-aware contrastive loss on the latents of student and teacher, source and target: the config's ``bacl``
    section, and the options of every BACL function and module (:meth:`of` builds them from keyword arguments)."""

    volume: bool = True
    boundary: bool = True
    # Side of the zeroed low-frequency cube as a fraction of the latent size.
    cutoff: float = Field(0.5, gt=0.0, lt=1.0)
    tau: float = Field(1.0, gt=0.0)
    # symmetric: centred cube, real rfft path; reference: the public code's fftshift mask, one bin asymmetric.
    mask: BaclMask = "symmetric"
    # sample: mean over the batch of per-sample losses; batch_mean: one loss of the batch-mean similarities (the
    # public code averages the cosine similarities over the batch before exp/log).
    reduction: BaclReduction = "sample"

    @property
    def has_term(self) -> bool:
        """Whether a term is on: a config with both off trains without the loss."""
        return self.volume or self.boundary

    def require_term(self) -> BaclOptions:
        """These options, for computing the loss, which needs a term; ``ValueError`` when both are off."""
        if not self.has_term:
            raise ValueError(
                f"at least one of volume and boundary must be on, got volume={self.volume!r}, "
                f"boundary={self.boundary!r}"
            )
        return self

    @classmethod
    def of(cls, options: BaclOptions | None = None, /, **overrides: Any) -> BaclOptions:
        """The options of a BACL call: ``options`` (None: the defaults) with keyword arguments replacing its fields,
        as in ``ops.bacl_loss(*latents, tau=0.5)``. A bad value is a ``ValueError`` naming the argument
        (``tau must be a finite number > 0, got 0``), an unknown name a ``TypeError``."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a BaclOptions, got {type(options).__name__}")
        base = _DEFAULT_BACL if options is None else options
        if not overrides:
            return base
        try:
            return cls(**{**dict(base), **overrides})
        except ConfigError as err:
            name = err.key.rpartition(".")[2]
            if err.unknown:
                raise TypeError(
                    f"unexpected BACL option {name!r}; the options are {', '.join(cls.model_fields)}"
                ) from None
            raise ValueError(f"{name} must be {err.expected}, got {err.given!r}{err.note}") from None


_DEFAULT_BACL = BaclOptions()


class EmaConfig(_Section):
    """How the teacher follows the student."""

    # none: no averaging (the teacher mirrors the student); ema: plain EMA with ``decay``; gsema: gradient surgery.
    mode: EmaMode = "gsema"
    # dot: aligned iff <g_src, g_trg> > 0 (angle < 90 degrees); sign: cosine of the sign vectors > 0.
    rule: EmaRule = "dot"
    decay_aligned: UnitInterval = 0.9
    # 1.0 leaves the teacher untouched on a conflicting step.
    decay_conflict: UnitInterval = 1.0
    # Plain EMA (mode: ema).
    decay: UnitInterval = 0.999
    # Early steps use min(decay, 1 - 1/(step + 1)) so the teacher is not stuck near its random start. Only a decay
    # below 1 is capped: decay_conflict 1.0 stays "no update".
    warmup: bool = True
    # The warm-up's step at the first update: 0 (first alpha 0, the teacher starts as the student); the public code
    # counts from 1 (first alpha 0.5).
    warmup_start: NonNegativeInt = 0


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    # SGD only.
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    # step: lr *= gamma every step_every_epochs; cosine: to min_lr over the run; constant: no schedule.
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_every_epochs: Count = 10
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: NonNegative = 0.0

    @model_validator(mode="after")
    def _floor_below_lr(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise _SettingError("min_lr", self.min_lr, f"expected a value in [0, optim.lr = {self.lr}]")
        return self


class TrainConfig(_Section):
    epochs: Count = 100
    steps_per_epoch: Count = 250
    # Stops the run early (after this many optimizer steps) whatever epochs says; None: no cap.
    max_steps: Count | None = None
    # Validate every this many epochs (and after the last); 0: only after the last.
    val_every: NonNegativeInt = 1
    # Also score the student on the validation cases (log.jsonl's "student_dice"): a teacher is worth having only
    # where it beats its student. Doubles the validation time; the teacher alone chooses best.pt either way.
    val_student: bool = False
    # false: validation during training does not mirror (eval.mirror_axes), as nnU-Net's online validation; best.pt is
    # still chosen there, and at the end the chosen teacher is scored mirrored on the held-out cases once more. Saves
    # 2^n - 1 of every 2^n sliding-window passes per validation; true: every validation mirrors.
    val_mirror: bool = True
    # GS-EMA: at each log record, the cosine of the source and target gradients in every layer of the student
    # ("layer_cos" in log.jsonl and TensorBoard, layer_agreement.png): where the target domain conflicts with the
    # source task. Computed on logging steps only, from the two gradient buffers already held apart.
    layer_agreement: bool = True
    # auto: bf16 on CUDA, fp32 on CPU (bf16 autocast of 3D convs on CPU is far slower than fp32).
    amp: AmpMode = "auto"
    # auto: compile on CUDA only.
    compile: Literal["auto"] | bool = "auto"
    # Keep the compiled code between runs of the same model, shapes and device, so a second run starts warm;
    # compile_cache_dir None: a per-user cache folder.
    compile_cache: bool = True
    compile_cache_dir: str | None = None
    seed: int = 0
    # Deterministic algorithms (slower); needed for bit-exact resume.
    deterministic: bool = False
    out_dir: str = Field("runs/gsema", min_length=1)
    # Steps between log records (losses stay on the device in between).
    log_every: Count = 10
    # Where the log records go: jsonl (log.jsonl, from which progress.png is drawn) and/or tensorboard (the folder
    # tensorboard/ in the run, needs the gsema-fast[tensorboard] extra).
    loggers: Annotated[list[LoggerName], AfterValidator(_each_once)] = ["jsonl"]
    # Consecutive steps with a non-finite loss or gradient after which the run stops.
    max_nonfinite_steps: Count = 5
    device: DeviceName = "auto"
    # On the CPU, keep freed memory in the process for reuse (see gsema_fast.memory): about 2x faster steps, while
    # the resident size stays at its peak.
    retain_cpu_memory: bool = True
    # Multi-process runs (torchrun): seconds any collective may wait for the other ranks before the job fails.
    dist_timeout_s: float = Field(600.0, ge=1.0)


def _distinct_pair(value: list[str]) -> list[str]:
    if value[0] == value[1]:
        raise ValueError("expected two different classes")
    return value


ClassName = Annotated[str, Field(min_length=1)]
ClassPair = Annotated[list[ClassName], Pair, AfterValidator(_distinct_pair)]


class Postprocess(_Section):
    """Post-processing of nnU-Net's kind, applied to every label map a network makes (the trainer's validation and
    final scoring, ``evaluate``, ``predict``): the ``eval.postprocess`` section, and the rules that
    :func:`gsema_fast.inference.postprocess.label_map` applies after the argmax. Classes are named as in the
    dataset's label map; components are 26-connected; ``keep_largest`` runs first. Empty (the default): the argmax
    alone."""

    # Of each class named, only its largest connected component stays; the rest becomes background.
    keep_largest: Annotated[list[ClassName], AfterValidator(_each_once)] = []
    # [class, to] pairs: of class, only the components that touch class `to` stay (an aneurysm grows from a vessel
    # wall; a blob of "aneurysm" in the background texture touches no vessel).
    attached: Annotated[list[ClassPair], AfterValidator(_each_once)] = []

    def __bool__(self) -> bool:
        return bool(self.keep_largest or self.attached)

    def describe(self) -> str:
        """The rules in words, for logs and summaries ("none" when there are none)."""
        parts = [f"largest component of {name}" for name in self.keep_largest]
        parts += [f"{name} touching {to}" for name, to in self.attached]
        return ", ".join(parts) or "none"

    def check(self, labels: Mapping[str, int], where: str = "the label map") -> None:
        """``ValueError`` naming a class that ``labels`` (name -> value, the dataset's) does not hold: checked
        before the work, so that a misspelt class never costs a training run."""
        known = [name for name in labels if name != "background"]
        for name in (*self.keep_largest, *(n for pair in self.attached for n in pair)):
            if name not in known:
                raise ValueError(
                    f"eval.postprocess: no class {name!r} in {where}; classes: {known} (name one of those, or post-"
                    f"process nothing: --set eval.postprocess.keep_largest=[] --set eval.postprocess.attached=[])"
                )


class EvalConfig(_Section):
    """Full-volume sliding-window inference, for validation and evaluation, and the label map's post-processing."""

    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: Count = 2
    mode: Literal["gaussian", "constant"] = "gaussian"
    weights: EvalWeights = "teacher"
    # Test-time mirroring, nnU-Net's: the logits averaged over the volume and its flips along every non-empty subset
    # of these spatial axes (0, 1, 2 of [D, H, W]), 2^n passes of the sliding window.
    mirror_axes: Annotated[list[Annotated[int, Field(ge=0, le=2)]], AfterValidator(_each_once)] = []
    postprocess: Postprocess = Field(default_factory=Postprocess)


class Config(_Section):
    """One run. Sections mirror the YAML files; ``note`` is a line the trainer shows when the run starts."""

    note: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    target_transform: TargetTransformConfig = Field(default_factory=TargetTransformConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    bacl: BaclOptions = Field(default_factory=BaclOptions)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _data_fits_the_model(self) -> Config:
        data, model = self.data, self.model
        patch = data.patch_size
        if model.name == "swinunetr":
            if any(s % SWIN_DIVISOR or s < SWIN_MIN_SIZE for s in patch):
                raise _SettingError(
                    "data.patch_size",
                    patch,
                    f"SwinUNETR needs every entry divisible by {SWIN_DIVISOR} and at least {SWIN_MIN_SIZE}",
                )
        else:
            divisor = 2 ** (model.level_count - 1)
            if any(s % divisor for s in patch):
                raise _SettingError(
                    "data.patch_size",
                    patch,
                    f"{model.name} with {model.level_count} levels needs multiples of {divisor}",
                )
        ratios = data.class_ratios
        if ratios is not None and len(ratios) != model.out_channels:
            raise _SettingError(
                "data.class_ratios",
                ratios,
                f"expected {model.out_channels} weights, one per class (model.out_channels)",
            )
        small = data.small_components
        if small.ratio > 0 and small.label >= model.out_channels:
            raise _SettingError(
                "data.small_components.label",
                small.label,
                f"expected a label value below model.out_channels = {model.out_channels}",
            )
        recall = self.loss
        if recall.recall_weight > 0 and any(c >= model.out_channels for c in recall.recall_classes):
            raise _SettingError(
                "loss.recall_classes",
                recall.recall_classes,
                f"expected label values from 1 to model.out_channels - 1 = {model.out_channels - 1}",
            )
        return self


M = TypeVar("M", bound=_Section)


def replace(model: M, /, **changes: Any) -> M:
    """A validated copy of a config or section with ``changes`` (what ``dataclasses.replace`` was for the sections):
    ``replace(cfg, train=replace(cfg.train, seed=3))``. ``model_copy(update=...)`` would skip validation."""
    if not isinstance(model, _Section):
        raise TypeError(f"replace takes a config or a config section, got {type(model).__name__}")
    return type(model)(**{**dict(model), **changes})


# ------------------------------------------------------------------------------------------ one-line errors
class _SettingError(ValueError):
    """A rule across settings that a value breaks (raised by the models' validators): ``key`` relative to the model
    whose validator raised it."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"{key}: {why}, got {value!r}")
        self.key, self.value, self.why = key, value, why


def _section_type(annotation: Any) -> type[_Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, _Section) else None


def _section_paths() -> dict[type, tuple[str, ...]]:
    """Each section's dotted place in a :class:`Config` (``GinConfig``: target_transform.gin), for the errors of
    sections built on their own."""
    paths: dict[type, tuple[str, ...]] = {Config: ()}
    pending = [Config]
    while pending:
        model = pending.pop()
        for name, field in model.model_fields.items():
            section = _section_type(field.annotation)
            if section is not None:
                paths[section] = (*paths[model], name)
                pending.append(section)
    return paths


_SECTION_PATHS = _section_paths()
_MISSING = object()
# Errors of a value that breaks a limit, where the value is shown as it is; the others say its type too.
_LIMIT_ERRORS = (
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_short",
    "too_long",
    "finite_number",
    "value_error",
)


def _describe(err: ValidationError, model: type[_Section], raw: Any) -> ConfigError:
    """The first problem ``err`` reports of ``model`` built from ``raw``, in one line: the dotted key (with the
    section's place in a Config), what was expected and the value."""
    first = err.errors(include_url=False)[0]
    error = first.get("ctx", {}).get("error")
    if isinstance(error, ConfigError):
        return error  # described by the section it arose in
    path, cls, field = list(_SECTION_PATHS.get(model, ())), model, None
    own: list[str] = []  # the same keys within ``raw``
    for part in first["loc"]:
        if not isinstance(part, str) or part not in cls.model_fields:
            if first["type"] == "extra_forbidden":
                return _unknown_key(cls, [*path, str(part)])
            break
        path.append(part)
        own.append(part)
        field = cls.model_fields[part]
        section = _section_type(field.annotation)
        if section is None:
            break  # a setting: the rest of the location names union members and list items within it
        cls, field = section, None
    if isinstance(error, _SettingError):
        key = ".".join([*path, error.key])
        return ConfigError(f"{key}: {error.why}, got {error.value!r}", key=key, given=error.value)
    key = ".".join(path) or "the config"
    value = _lookup(raw, own)
    if value is _MISSING:
        value = first["input"]
    note = "" if first["type"] in _LIMIT_ERRORS else f" ({type(value).__name__})"
    if field is None:
        expected = "a section (mapping of keys)"
        return ConfigError(f"{key}: expected {expected}, got {value!r}{note}", key=key, expected=expected, given=value)
    expected = _field_expectation(field)
    if first["type"] == "value_error" and error is not None:
        expected = str(error).removeprefix("expected ")
    shown = repr(_as_read(value, field.annotation))
    message = f"{key}: expected {expected}, got {shown}{note}"
    return ConfigError(message, key=key, expected=expected, given=value, note=note)


def _unknown_key(cls: type[_Section], path: Sequence[str]) -> ConfigError:
    key, section = ".".join(path), ".".join(path[:-1])
    close = difflib.get_close_matches(path[-1], list(cls.model_fields), n=1)
    hint = f" (did you mean '{'.'.join((*path[:-1], close[0]))}'?)" if close else ""
    message = f"unknown key '{key}'{hint}; {section or 'the config'} has: {', '.join(cls.model_fields)}"
    return ConfigError(message, key=key, unknown=True)


def _lookup(raw: Any, path: Sequence[str]) -> Any:
    for part in path:
        if isinstance(raw, Mapping) and part in raw:
            raw = raw[part]
        elif isinstance(raw, BaseModel) and part in type(raw).model_fields:
            raw = getattr(raw, part)
        else:
            return _MISSING
    return raw


def _as_read(value: Any, annotation: Any) -> Any:
    """``value`` as the config reads it: an int where a float is expected is the float."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _as_read(value, typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        floats = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _as_read(value, floats[0]) if len(floats) == 1 else value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_as_read(v, typing.get_args(annotation)[0]) for v in value]
    return value


# What a setting takes, in words, from its type: "an int >= 1", "a list of 2 numbers > 0", "one of 'dot', 'sign'".
_NOUNS = {
    bool: ("a bool", "bools"),
    int: ("an int", "ints"),
    str: ("a string", "strings"),
}


def _field_expectation(field: FieldInfo) -> str:
    return _expectation(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)


def _expectation(tp: Any, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *metadata = typing.get_args(tp)
        return _constrained(base, _flat_metadata(metadata), plural)
    if origin in (typing.Union, types.UnionType):
        return _union_expectation(typing.get_args(tp), plural)
    if origin is Literal:
        return f"{'values among' if plural else 'one of'} {', '.join(_yaml_repr(v) for v in typing.get_args(tp))}"
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {_expectation(typing.get_args(tp)[0], plural=True)}"
    if _section_type(tp) is not None:
        return "sections (mappings of keys)" if plural else "a section (mapping of keys)"
    if tp is float:
        return "finite numbers" if plural else "a finite number"
    return _NOUNS.get(tp, (getattr(tp, "__name__", str(tp)),) * 2)[plural]


def _choices(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else (True, False) if tp is bool else ()


def _yaml_repr(value: Any) -> str:
    # Spelled as YAML spells them, so true/false rather than True/False.
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _union_expectation(options: Sequence[Any], plural: bool) -> str:
    choices = [choice for option in options for choice in _choices(option)]
    parts = [f"one of {', '.join(_yaml_repr(c) for c in choices)}"] if choices else []
    parts += [_expectation(o, plural) for o in options if not _choices(o) and o is not type(None)]
    if type(None) in options:
        parts.append("null")
    return " or ".join(parts)


def _flat_metadata(metadata: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in metadata:
        flat.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return flat


_BOUNDS = ("ge", "gt", "le", "lt", "min_length", "max_length")


def _constrained(base: Any, metadata: Sequence[Any], plural: bool) -> str:
    bounds = {name: getattr(m, name) for m in metadata for name in _BOUNDS if getattr(m, name, None) is not None}
    if typing.get_origin(base) is list:
        low, high = bounds.get("min_length"), bounds.get("max_length")
        size = (
            f"{low} "
            if low is not None and low == high
            else "one or more "
            if low == 1
            else f"at least {low} "
            if low
            else ""
        )
        text = f"{'lists' if plural else 'a list'} of {size}{_expectation(typing.get_args(base)[0], plural=True)}"
        if any(getattr(m, "func", None) is _cube for m in metadata):
            text += ", or one value for all three axes"
        return text
    text = _expectation(base, plural)
    low = f"[{bounds['ge']:g}" if "ge" in bounds else f"({bounds['gt']:g}" if "gt" in bounds else None
    high = f"{bounds['le']:g}]" if "le" in bounds else f"{bounds['lt']:g})" if "lt" in bounds else None
    if low and high:
        return f"{text.replace('finite ', '')} in {low}, {high}"
    if low:
        return f"{text} {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f"{text} {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return text


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
    """Read, override and validate a config.

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
        err.args = (f"{where}: {err}",)  # the same error (a ConfigError keeps its key), said where it came from
        raise


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a nested mapping (e.g. one stored in a checkpoint), then ``overrides``."""
    raw = _merge({}, copy.deepcopy(dict(data)))  # overrides edit nested sections in place: never the caller's
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text)
    return Config.model_validate(raw)


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
    """Plain nested dict (lists, not tuples) that ``config_from_dict`` turns back into an equal config: what a
    checkpoint stores, read back exactly by this and earlier versions."""
    return cfg.model_dump()


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
    return replace(cfg, data=replace(cfg.data, **paths))


def resolve_device(device: str = "auto", *, key: str = "train.device") -> str:
    """The device a setting names, on this machine: ``auto`` is CUDA where a CUDA device is available, else the CPU;
    any other name is kept. A CUDA device asked for where there is none is a ``ValueError`` naming ``key``."""
    if device != "auto" and not device.startswith("cuda"):
        return device
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise ValueError(f"{key}: {device!r} was asked for but no CUDA device is available")
    return device


def resolve_amp(amp: str, device_type: str) -> str:
    """The autocast type a ``train.amp`` setting means on a device type (``cpu``, ``cuda``): ``auto`` is bf16 on
    CUDA and fp32 elsewhere (bf16 autocast of 3D convolutions on a CPU is far slower than fp32)."""
    check_choice("train.amp", amp, AmpMode)
    if amp != "auto":
        return amp
    return "bf16" if device_type == "cuda" else "fp32"


def resolve_auto(cfg: Config, device: str | None = None) -> Config:
    """A copy of ``cfg`` with ``train.device``, ``train.amp`` and ``train.compile`` resolved for a device type.

    ``device``: ``"cpu"`` or ``"cuda"``; None uses ``train.device``, where ``auto`` means CUDA when available.
    auto amp is bf16 on CUDA and fp32 on CPU; auto compile is on for CUDA only.
    """
    train = cfg.train if device is None else replace(cfg.train, device=device)
    on_cuda = resolve_device(train.device) == "cuda"
    amp = resolve_amp(train.amp, "cuda" if on_cuda else "cpu")
    if amp != "fp32" and not on_cuda:
        log.warning("train.amp=%s on the CPU: 3D convolutions under CPU autocast are much slower than fp32", amp)
    compile_ = on_cuda if train.compile == "auto" else train.compile
    return replace(cfg, train=replace(train, device="cuda" if on_cuda else "cpu", amp=amp, compile=compile_))
