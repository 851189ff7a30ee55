"""Config: YAML round trip, overrides, and errors that name the key and the value."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from gsema_fast.config import (
    BaclOptions,
    Config,
    ConfigError,
    DataConfig,
    EmaConfig,
    GeometricConfig,
    TargetTransformConfig,
    builtin_config_names,
    config_from_dict,
    config_to_dict,
    load_config,
    replace,
    resolve_auto,
    resolve_device,
    save_config,
    with_overrides,
)

SHIPPED = ("demo", "gpu", "paper", "reference")


def test_shipped_configs_load_and_validate():
    assert set(SHIPPED) <= set(builtin_config_names())
    for name in SHIPPED:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.note, f"{name}.yaml should say what it is"


def test_default_is_the_cpu_demo():
    cfg = load_config()
    assert cfg == load_config("demo")
    assert cfg.model.name == "unet"
    assert cfg.data.root is None


def test_gpu_and_method_configs_pin_their_columns():
    assert load_config("gpu").model.name == "swinunetr"
    paper, reference = load_config("paper"), load_config("reference")
    assert (paper.ema.rule, paper.ema.decay_conflict, paper.bacl.mask) == ("dot", 1.0, "symmetric")
    assert (paper.loss.lambda_sup, paper.loss.lambda_con) == (0.25, 0.5)
    assert (reference.ema.rule, reference.ema.decay_conflict, reference.bacl.mask) == ("sign", 0.999, "reference")
    assert (reference.loss.lambda_sup, reference.loss.lambda_con) == pytest.approx((0.8 * 0.25, 0.2))
    assert (reference.bacl.volume, reference.bacl.boundary) == (False, True)


def test_yaml_round_trip(tmp_path):
    cfg = load_config("reference", ["data.train_domains=[a, b]", "train.max_steps=7", "note=round trip"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert not list(path.parent.glob("*.tmp")), "the temp file of the atomic write must be gone"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        "gpu",
        [
            "data.patch_size=[64,64,128]",
            "optim.lr=1e-4",  # YAML 1.1 would read this as a string
            "ema.mode=none",
            "train.compile=false",
            "target_transform.gin.enabled=false",
            "data.root=",  # empty value is null
            "bacl={tau: 0.5}",  # a mapping merges into the section
        ],
    )
    assert cfg.data.patch_size == [64, 64, 128]
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.ema.mode == "none"
    assert cfg.train.compile is False
    assert cfg.target_transform.gin.enabled is False
    assert cfg.data.root is None
    assert cfg.bacl.tau == 0.5 and cfg.bacl.boundary is True


def test_int_widens_to_float_and_cube_shorthand():
    cfg = load_config("demo", ["bacl.tau=2", "data.patch_size=32", "data.spacing=0.5"])
    assert cfg.bacl.tau == 2.0 and isinstance(cfg.bacl.tau, float)
    assert cfg.data.patch_size == [32, 32, 32]
    assert cfg.data.spacing == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("data.patchsize=[64,64,64]", ["data.patchsize", "did you mean 'data.patch_size'"]),
        ("target_transform.gin.kernel=3", ["'target_transform.gin.kernel'", "'target_transform.gin.kernels'?"]),
        ("nonsense.key=1", ["nonsense"]),
    ],
)
def test_unknown_key_is_named(override, fragments):
    with pytest.raises(ValueError, match="unknown key") as err:
        load_config("demo", [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: unet\n  feature_sise: 16\n")
    with pytest.raises(ValueError, match=r"model\.feature_sise") as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.epochs=abc", ["train.epochs", "'abc'", "int"]),
        ("train.epochs=true", ["train.epochs", "True"]),  # a bool is not an int
        ("train.epochs=2.5", ["train.epochs", "2.5"]),
        ("bacl.volume=1", ["bacl.volume", "bool"]),
        ("data.patch_size=[64,x,64]", ["data.patch_size", "'x'"]),
        ("model=unet", ["model", "section"]),
        ("model.name.sub=1", ["model.name", "not a section"]),
    ],
)
def test_wrong_type_names_key_and_value(override, fragments):
    with pytest.raises(ValueError) as err:
        load_config("demo", [override])
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("ema.mode=gs-ema", "ema.mode", "'gs-ema'"),
        ("ema.rule=cosine", "ema.rule", "'cosine'"),
        ("bacl.mask=square", "bacl.mask", "'square'"),
        ("model.name=resnet", "model.name", "'resnet'"),
        ("train.amp=bf32", "train.amp", "'bf32'"),
        ("train.compile=maybe", "train.compile", "'maybe'"),
    ],
)
def test_enum_error(override, key, value):
    with pytest.raises(ValueError, match="one of") as err:
        load_config("demo", [override])
    assert key in str(err.value) and value in str(err.value)


@pytest.mark.parametrize("patch", ["[48,48,48]", "[96,96,80]", "32"])
def test_swinunetr_patch_size_error(patch):
    with pytest.raises(ValueError, match=r"data\.patch_size") as err:
        load_config("gpu", [f"data.patch_size={patch}"])
    assert "32" in str(err.value)


def test_patch_size_rule_follows_the_network():
    # 48 is fine for a 4-level UNet (multiples of 8), not for SwinUNETR.
    assert load_config("demo", ["data.patch_size=48"]).data.patch_size == [48, 48, 48]
    with pytest.raises(ValueError, match=r"data\.patch_size"):
        load_config("demo", ["data.patch_size=[64,64,60]"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ema.decay_aligned=1.5", "ema.decay_aligned"),
        ("ema.decay_conflict=-0.1", "ema.decay_conflict"),
        ("ema.decay=2", "ema.decay"),
        ("bacl.tau=0", "bacl.tau"),
        ("bacl.cutoff=1.0", "bacl.cutoff"),
        ("bacl.cutoff=0", "bacl.cutoff"),
        ("target_transform.noise.p=1.5", "target_transform.noise.p"),
        ("target_transform.geometric.scale=[1.2,0.8]", "target_transform.geometric.scale"),
        ("target_transform.gin.kernels=[2]", "target_transform.gin.kernels"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.val_per_domain=-1", "data.val_per_domain"),
        ("data.samples_per_volume=3", "data.samples_per_volume"),  # must divide the batch
        ("data.class_ratios=[1,1]", "data.class_ratios"),  # one per class
        ("data.small_components.ratio=-1", "data.small_components.ratio"),
        ("data.small_components.below_mm3=0", "data.small_components.below_mm3"),
        ("data.small_components.label=3", None),  # off (ratio 0): not checked
        ("loss.recall_weight=-0.5", "loss.recall_weight"),
        ("loss.recall_classes=[0]", "loss.recall_classes"),  # background is not a rare class
        ("loss.recall_classes=[2,2]", "loss.recall_classes"),
        ("data.train_domains=[a,b]", None),  # fine on its own
        ("model.feature_size=16", None),  # fine for the demo's UNet, not for SwinUNETR (below)
        ("model.checkpointing=true", "model.checkpointing"),  # SwinUNETR only
        ("optim.lr=0", "optim.lr"),
        ("train.max_steps=0", "train.max_steps"),
    ],
)
def test_value_ranges(override, key):
    if key is None:
        load_config("demo", [override])
        return
    with pytest.raises(ValueError) as err:
        load_config("demo", [override])
    assert key in str(err.value)


def test_cross_checks():
    with pytest.raises(ValueError, match=r"model\.feature_size"):
        load_config("gpu", ["model.feature_size=16"])
    with pytest.raises(ValueError, match=r"data\.train_domains"):
        load_config("demo", ["data.train_domains=[a,b]", "data.test_domain=a"])
    with pytest.raises(ValueError, match=r"data\.train_domains"):
        load_config("demo", ["data.train_domains=[0,'1',2]", "data.test_domain='2'"])
    cfg = load_config("demo", ["data.train_domains=[0,1,2]", "data.test_domain=3"])
    assert (cfg.data.train_domains, cfg.data.test_domain) == ([0, 1, 2], 3)
    with pytest.raises(ValueError, match=r"data\.small_components\.label: expected a label value below model\.out"):
        load_config("demo", ["data.small_components.ratio=1", "data.small_components.label=3"])
    with pytest.raises(ValueError, match=r"loss\.recall_classes: expected label values from 1 to model\.out_channels"):
        load_config("demo", ["loss.recall_weight=1", "loss.recall_classes=[1,3]"])
    assert load_config("demo", ["loss.recall_weight=1", "loss.recall_classes=[1,2]"]).loss.recall_classes == [1, 2]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: replace(Config(), ema=replace(Config().ema, mode="sometimes")), "ema.mode: expected one of"),
        (lambda: Config(ema=EmaConfig(mode="sometimes")), "ema.mode: expected one of"),
        (lambda: EmaConfig(mode="sometimes"), "ema.mode: expected one of"),
        # nested sections at every depth, as a section or as a mapping, on their own or in a Config
        (lambda: GeometricConfig(image_mode="bicubic"), "target_transform.geometric.image_mode: expected one of"),
        (lambda: TargetTransformConfig(geometric={"image_mode": "bicubic"}), "target_transform.geometric.image_mode"),
        (lambda: Config(target_transform={"geometric": {"image_mode": "bicubic"}}), "geometric.image_mode: expected"),
        (
            lambda: replace(Config(), target_transform=TargetTransformConfig(geometric=GeometricConfig(p=2))),
            "target_transform.geometric.p: expected a number in [0, 1], got 2.0",
        ),
        (lambda: TargetTransformConfig(gin={"kernel": [3]}), "unknown key 'target_transform.gin.kernel'"),
        # the rules across settings and sections
        (lambda: DataConfig(batch_size=3, samples_per_volume=2), "data.samples_per_volume: must divide"),
        (lambda: Config(data=DataConfig(patch_size=(48, 48, 48))), "data.patch_size: SwinUNETR needs"),
        (lambda: replace(load_config("gpu"), data=replace(Config().data, patch_size=48)), "data.patch_size"),
        (lambda: Config.model_validate({"model": {"feature_size": 16}}), "model.feature_size: SwinUNETR needs"),
        (lambda: replace(Config(), nonsense=1), "unknown key 'nonsense'"),
    ],
)
def test_configs_built_in_code_are_validated_too(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_configs_are_immutable():
    cfg = load_config("demo")
    with pytest.raises(ValueError, match="frozen"):
        cfg.ema.mode = "sometimes"
    with pytest.raises(ValueError, match="frozen"):
        cfg.target_transform.geometric.image_mode = "bicubic"
    assert cfg == load_config("demo")
    with pytest.raises(TypeError, match="got dict"):
        replace(config_to_dict(cfg), note="x")


def _leaf_keys(model=Config, prefix=()):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaf_keys(field.annotation, (*prefix, name))
        else:
            yield (*prefix, name)


LEAF_KEYS = [".".join(key) for key in _leaf_keys()]


def test_every_setting_is_reached_by_the_leaf_walk():
    assert len(LEAF_KEYS) > 90 and "target_transform.geometric.image_mode" in LEAF_KEYS and "note" in LEAF_KEYS


@pytest.mark.parametrize("key", LEAF_KEYS)
def test_every_setting_refuses_a_value_of_no_type_it_takes(key):
    """A mapping is no setting's value: the error names the key at every depth, whether the value came from --set
    or from a section built in code."""
    with pytest.raises(ConfigError) as from_override:
        with_overrides(Config(), f"{key}={{bad: 1}}")
    *sections, last = key.split(".")
    nested = {last: {"bad": 1}}
    for section in reversed(sections):
        nested = {section: nested}
    with pytest.raises(ConfigError) as in_code:
        Config(**nested)
    for err in (from_override, in_code):
        assert str(err.value).startswith(f"{key}: expected "), str(err.value)
        assert str(err.value).endswith("got {'bad': 1} (dict)") and err.value.key == key


def test_a_loaded_config_error_says_where_it_came_from_and_keeps_its_key(tmp_path):
    """load_config prefixes the file (or --set) to the message and re-raises the same ConfigError, so callers can
    still read the dotted key and the value."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seed: '3'\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    with pytest.raises(ConfigError) as from_override:
        load_config("demo", ["ema.rule=often"])
    assert str(from_file.value) == f"{path}: train.seed: expected an int, got '3' (str)"
    assert (from_file.value.key, from_file.value.given) == ("train.seed", "3")
    assert str(from_override.value).startswith("shipped config 'demo' with --set overrides: ema.rule: expected one of")
    assert (from_override.value.key, from_override.value.given) == ("ema.rule", "often")


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config("demo", ["train.epochs"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config("demo", ["train..epochs=1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="shipped config"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


def test_resolve_auto(monkeypatch, caplog):
    import torch

    cpu = resolve_auto(load_config("gpu"), "cpu").train
    assert (cpu.device, cpu.amp, cpu.compile) == ("cpu", "fp32", False)
    pinned = resolve_auto(load_config("demo", ["train.amp=fp32", "train.compile=true"]), "cpu").train
    assert (pinned.amp, pinned.compile) == ("fp32", True)
    with caplog.at_level(logging.WARNING, logger="gsema_fast.config"):
        assert resolve_auto(load_config("demo", ["train.amp=bf16"]), "cpu").train.amp == "bf16"
    assert "train.amp=bf16 on the CPU: 3D convolutions under CPU autocast are much slower" in caplog.text

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = resolve_auto(load_config("gpu")).train
    assert (cuda.device, cuda.amp, cuda.compile) == ("cuda", "bf16", True)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_auto(load_config("gpu")).train.device == "cpu"
    with pytest.raises(ValueError, match=r"train\.device"):
        resolve_auto(load_config("gpu", ["train.device=cuda"]))


def test_target_transform_from_a_config_resolves_as_the_keyword_form():
    from gsema_fast.data.target import ORDER, TargetTransform

    assert list(ORDER) == list(TargetTransformConfig.model_fields), "applied in the config's order"
    assert TargetTransform.from_config(Config().target_transform, seed=0).cfg == TargetTransform().cfg
    cfg = with_overrides(Config(), "target_transform.gin.kernels=[3]", "target_transform.noise.enabled=false")
    built = TargetTransform.from_config(cfg.target_transform, seed=4)
    assert built.seed == 4
    assert built.cfg == TargetTransform(gin={"kernels": (3,)}, noise=False).cfg
    with pytest.raises(TypeError, match="got Config"):
        TargetTransform.from_config(cfg, seed=0)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), {}),
        (("target_transform.gin.p=1.0",), {("target_transform", "gin", "p"): 1.0}),
        (
            ("ema.mode=none", "data.patch_size=32", "ema.mode=ema"),  # in order: the last one wins
            {("ema", "mode"): "ema", ("data", "patch_size"): [32, 32, 32]},
        ),
        (("bacl={tau: 2}",), {("bacl", "tau"): 2.0}),  # a mapping merges into its section: the rest stays
    ],
)
def test_with_overrides_applies_them_to_a_copy(overrides, expected):
    original = load_config("demo")
    before = copy.deepcopy(original)
    derived = with_overrides(original, *overrides)
    assert original == before, "the original is left as it was"
    assert derived is not original and derived.data is not original.data
    changed = config_to_dict(original)
    for path, value in expected.items():
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    assert config_to_dict(derived) == changed
    assert derived == load_config("demo", list(overrides)), "the same as --set"


@pytest.mark.parametrize(
    ("override", "error", "fragments"),
    [
        ("target_transform.gin.kernel=[3]", ValueError, ["unknown key 'target_transform.gin.kernel'", "kernels"]),
        ("nonsense=1", ValueError, ["unknown key 'nonsense'"]),
        ("bacl.tau=warm", ValueError, ["bacl.tau", "'warm'"]),
        ("bacl.tau=0", ValueError, ["bacl.tau", "got 0.0"]),
        ("ema.mode=sometimes", ValueError, ["ema.mode", "'sometimes'"]),
        ("bacl.tau", ValueError, ["expected KEY=VALUE", "'bacl.tau'"]),
        (["bacl.tau=2"], TypeError, ["'a.b=c' strings", "['bacl.tau=2']"]),
    ],
)
def test_with_overrides_rejects_bad_overrides(override, error, fragments):
    original = Config()
    with pytest.raises(error) as err:
        with_overrides(original, override)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert original == Config()


def test_with_overrides_takes_a_config():
    with pytest.raises(TypeError, match="cfg must be a Config, got dict"):
        with_overrides(config_to_dict(Config()), "bacl.tau=2")


def test_config_from_dict_leaves_the_callers_dict_alone():
    from gsema_fast.config import Config, config_from_dict, config_to_dict

    raw = config_to_dict(Config())
    cfg = config_from_dict(raw, ["loss.lambda_con=0", "ema.mode=none"])
    assert cfg.loss.lambda_con == 0 and cfg.ema.mode == "none"
    assert raw["loss"]["lambda_con"] == 0.5 and raw["ema"]["mode"] == "gsema"


# Configs as checkpoints of version 0.1.0 store them (config_to_dict of a run's resolved config), written by that
# version: one of the CPU demo, one with a value of every kind (paths, mixed domain names, spacing, lists, bf16).
STORED = json.loads((Path(__file__).parent / "data" / "configs_0.1.0.json").read_text())


def _typed(tree):
    """The tree with each value's type beside it: a stored 1.0 read back as 1 is not the same config."""
    if isinstance(tree, dict):
        return {key: _typed(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_typed(value) for value in tree]
    return (type(tree).__name__, tree)


# Settings added since 0.1.0, with the value an earlier config reads back with (its behaviour then, or a logging
# switch that changes no number): a stored config reads back exactly, plus these.
ADDED_SINCE_0_1_0 = {
    ("train", "layer_agreement"): True,
    ("eval", "mirror_axes"): [],
    ("eval", "postprocess"): {"keep_largest": [], "attached": []},
    ("data", "small_components"): {"ratio": 0.0, "label": 2, "below_mm3": 50.0},
    ("loss", "recall_weight"): 0.0,
    ("loss", "recall_classes"): [2],
    ("train", "val_mirror"): True,
}


def _without_added(tree):
    tree = copy.deepcopy(tree)
    for section, key in ADDED_SINCE_0_1_0:
        del tree[section][key]
    return tree


def _reads_back_exactly(dumped, stored):
    """``dumped`` is ``stored`` (values, types, key order), plus the settings added since with their values."""
    assert all(_typed(dumped[section][key]) == _typed(value) for (section, key), value in ADDED_SINCE_0_1_0.items())
    assert _typed(_without_added(dumped)) == _typed(stored)
    assert json.dumps(_without_added(dumped)) == json.dumps(stored), "the same keys in the same order"
    return True


@pytest.mark.parametrize("name", sorted(STORED))
def test_a_config_stored_by_an_earlier_version_reads_back_exactly(name, tmp_path):
    stored = STORED[name]
    cfg = config_from_dict(stored)
    assert _reads_back_exactly(config_to_dict(cfg), stored)
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert _reads_back_exactly(config_to_dict(load_config(saved)), stored)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_the_settings_added_since_0_1_0_are_the_only_ones():
    stored = {(section, key) for section, keys in STORED["demo"].items() if isinstance(keys, dict) for key in keys}
    current = {
        (section, key) for section, keys in config_to_dict(Config()).items() if isinstance(keys, dict) for key in keys
    }
    assert current - stored == set(ADDED_SINCE_0_1_0) and stored <= current


def test_a_checkpoint_of_an_earlier_version_loads_and_resumes_unchanged(tmp_path):
    from gsema_fast.inference import load_checkpoint
    from gsema_fast.models import build_model
    from gsema_fast.training.checkpoints import resume_changes

    stored = STORED["demo"]
    net = build_model(stored["model"])
    state = {"config": stored, "teacher": net.state_dict(), "student": net.state_dict(), "step": 3, "epoch": 1}
    torch.save(state, tmp_path / "final.pt")
    loaded = load_checkpoint(tmp_path / "final.pt", device="cpu")
    assert _reads_back_exactly(config_to_dict(loaded.config), stored)
    assert loaded.amp_dtype is None and loaded.step == 3
    for config in STORED.values():
        assert resume_changes({"config": config, "dataset": {}}, config_from_dict(config), tmp_path) == []


def test_replace_makes_a_validated_copy():
    cfg = load_config("demo")
    changed = replace(cfg, train=replace(cfg.train, seed=3), note="seed 3")
    assert (changed.train.seed, changed.note, cfg.train.seed) == (3, "seed 3", 0)
    assert changed == with_overrides(cfg, "train.seed=3", "note=seed 3")
    with pytest.raises(ConfigError, match=r"^train\.seed: expected an int, got '3' \(str\)$"):
        replace(cfg.train, seed="3")
    with pytest.raises(ConfigError, match=r"^data\.patch_size: unet with 4 levels needs multiples of 8"):
        replace(cfg, data=replace(cfg.data, patch_size=36))


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (resolve_device("auto"), resolve_device("cpu"), resolve_device("meta")) == ("cpu", "cpu", "meta")
    with pytest.raises(ValueError, match=r"^device: 'cuda:1' was asked for but no CUDA device is available$"):
        resolve_device("cuda:1", key="device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (resolve_device("auto"), resolve_device("cuda:1")) == ("cuda", "cuda:1")
    with pytest.raises(ConfigError, match=r"^train\.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'"):
        resolve_auto(Config(), "gpu")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tau": 0}, "tau must be a finite number > 0, got 0"),
        ({"tau": True}, "tau must be a finite number > 0, got True (bool)"),
        ({"cutoff": 1}, "cutoff must be a number in (0, 1), got 1"),
        ({"mask": "centred"}, "mask must be one of 'symmetric', 'reference', got 'centred' (str)"),
        ({"reduction": None}, "reduction must be one of 'sample', 'batch_mean', got None (NoneType)"),
        ({"volume": 1}, "volume must be a bool, got 1 (int)"),
    ],
)
def test_bacl_options_from_arguments_name_the_argument(overrides, message):
    with pytest.raises(ValueError) as err:
        BaclOptions.of(**overrides)
    assert str(err.value) == message


def test_bacl_options_are_the_config_section():
    cfg = load_config("reference")
    assert isinstance(cfg.bacl, BaclOptions) and BaclOptions.of(cfg.bacl) is cfg.bacl
    assert BaclOptions.of(cfg.bacl, tau=0.5) == replace(cfg.bacl, tau=0.5)
    assert BaclOptions.of() == BaclOptions() == Config().bacl
    assert hash(BaclOptions.of(tau=2)) == hash(BaclOptions(tau=2.0)), "frozen: usable as a cache key"
    with pytest.raises(TypeError, match="unexpected BACL option 'tua'"):
        BaclOptions.of(tua=0.5)
    with pytest.raises(TypeError, match="options must be a BaclOptions, got dict"):
        BaclOptions.of({"tau": 0.5})
    off = with_overrides(cfg, "bacl.volume=false", "bacl.boundary=false").bacl  # a config may turn the loss off
    assert not off.has_term
    with pytest.raises(ValueError, match="at least one of volume and boundary must be on"):
        off.require_term()


def test_check_choice_takes_the_configs_choices():
    from gsema_fast.config import EmaMode, check_choice

    check_choice("ema.mode", "gsema", EmaMode)
    for bad in ("GSEMA", None, 1):
        with pytest.raises(ValueError, match=rf"^ema\.mode must be one of 'none', 'ema', 'gsema', got {bad!r}$"):
            check_choice("ema.mode", bad, EmaMode)
