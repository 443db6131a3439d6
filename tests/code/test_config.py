"""tidal.config: unknown keys, types, overrides, presets, YAML number quirks, the packaged YAML files."""
from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest
import yaml

from tidal.config import DEFAULTS, PRESETS, ConfigError, flatten, load_params, parse_override, string_override

REPO = Path(__file__).resolve().parents[2]
PARAMS_DIR = REPO / "tidal" / "params"
PRESET_FILES = sorted((PARAMS_DIR / "presets").glob("*.yaml"))


def _typed(params: dict) -> list[tuple]:
    """Flattened (key, type, value) in order: 1, 1.0 and True compare equal, their types do not."""
    return [(k, type(v).__name__, v) for k, v in flatten(params).items()]


def _write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_file():
    params = load_params(None)
    assert params["train"]["epochs"] == DEFAULTS["train"]["epochs"]
    assert params["strategy"] == DEFAULTS["strategy"]


@pytest.mark.parametrize("text, key, hint", [
    ("strategyy: entropy\n", "strategyy", "strategy"),
    ("train:\n  epochss: 5\n", "train.epochss", "train.epochs"),
])
def test_unknown_key_names_full_key_and_suggests_match(tmp_path, text, key, hint):
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, text))
    msg = str(err.value)
    assert f"'{key}'" in msg
    assert f"did you mean '{hint}'" in msg


def test_unknown_nested_key_via_override():
    with pytest.raises(ConfigError) as err:
        load_params(None, ["train.ephocs=5"])
    assert "train.ephocs" in str(err.value)
    assert "train.epochs" in str(err.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("cycles: three\n", "cycles"),  # int expected, string given
        ("cycles: 2.5\n", "cycles"),  # int expected, float given
        ("train:\n  epochs: true\n", "train.epochs"),  # bool is not an int
        ("train:\n  lr: fast\n", "train.lr"),  # number expected
        ("train:\n  hflip: 1\n", "train.hflip"),  # bool expected
        ("strategy: 3\n", "strategy"),  # string expected
        ("train:\n  milestones: 30\n", "train.milestones"),  # list expected
        ("train: 5\n", "train"),  # mapping expected
    ],
)
def test_wrong_type_raises_naming_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert f"'{key}'" in str(err.value)


def test_int_accepted_where_float_expected_and_converted(tmp_path):
    params = load_params(_write(tmp_path, "train:\n  lr: 1\n"))
    assert params["train"]["lr"] == 1.0
    assert isinstance(params["train"]["lr"], float)


def test_set_overrides_apply_and_win_over_file(tmp_path):
    path = _write(tmp_path, "cycles: 7\ntrain:\n  epochs: 9\n  batch_size: 16\n")
    params = load_params(path, ["train.epochs=5", "strategy=entropy"])
    assert params["train"]["epochs"] == 5
    assert isinstance(params["train"]["epochs"], int)
    assert params["strategy"] == "entropy"
    # keys not overridden keep the file's values, siblings in the same mapping included
    assert params["cycles"] == 7
    assert params["train"]["batch_size"] == 16


def test_later_override_wins_over_earlier():
    params = load_params(None, ["train.epochs=5", "train.epochs=6"])
    assert params["train"]["epochs"] == 6


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError):
        load_params(None, ["train.epochs"])


def test_override_scientific_notation_is_float():
    params = load_params(None, ["train.weight_decay=1e-3"])
    assert params["train"]["weight_decay"] == pytest.approx(1e-3)
    assert isinstance(params["train"]["weight_decay"], float)


def test_parse_override_nested_structure():
    assert parse_override("train.epochs=5") == {"train": {"epochs": 5}}
    assert parse_override("train.milestones=[3, 4]") == {"train": {"milestones": [3, 4]}}


def test_debug_preset_applied():
    params = load_params(None, ["preset=debug"])
    debug = PRESETS["debug"]
    assert params["preset"] == "debug"
    assert params["cycles"] == debug["cycles"] != DEFAULTS["cycles"]
    assert params["train"]["epochs"] == debug["train"]["epochs"] != DEFAULTS["train"]["epochs"]
    assert params["train"]["milestones"] == debug["train"]["milestones"]
    # keys the preset does not name keep the defaults (nested merge, not replacement)
    assert params["train"]["lr"] == DEFAULTS["train"]["lr"]
    assert params["train"]["momentum"] == DEFAULTS["train"]["momentum"]


def test_set_overrides_win_over_preset(tmp_path):
    path = _write(tmp_path, "preset: debug\n")
    params = load_params(path, ["cycles=4", "train.epochs=7", "budget=25"])
    assert params["cycles"] == 4
    assert params["train"]["epochs"] == 7
    assert params["budget"] == 25
    # what is not explicit still comes from the preset
    assert params["initial_size"] == PRESETS["debug"]["initial_size"]
    assert params["train"]["batch_size"] == PRESETS["debug"]["train"]["batch_size"]


def test_preset_applies_over_params_file(tmp_path):
    # Documented order: defaults <- params file <- preset <- overrides, so `--set preset=debug`
    # makes any params.yaml tiny while the file's other keys stay.
    path = _write(tmp_path, "cycles: 9\nstrategy: entropy\ntrain:\n  epochs: 50\n  lr: 0.2\n")
    params = load_params(path, ["preset=debug"])
    assert params["cycles"] == PRESETS["debug"]["cycles"]
    assert params["train"]["epochs"] == PRESETS["debug"]["train"]["epochs"]
    assert params["strategy"] == "entropy"
    assert params["train"]["lr"] == 0.2


def test_preset_from_override_and_explicit_override_wins():
    params = load_params(None, ["train.epochs=11", "preset=debug"])
    assert params["train"]["epochs"] == 11
    assert params["cycles"] == PRESETS["debug"]["cycles"]


def test_unknown_preset_is_an_error_that_names_the_presets():
    with pytest.raises(ConfigError) as err:
        load_params(None, ["preset=nope"])
    msg = str(err.value)
    assert "params key 'preset'" in msg and "'nope'" in msg
    assert all(f"'{f.stem}'" in msg for f in PRESET_FILES) and len(PRESET_FILES) >= 7
    assert str(PARAMS_DIR / "presets") in msg  # where to read them


def test_preset_debug_shrinks_the_repositorys_experiment():
    full = load_params(REPO / "params.yaml", [])
    tiny = load_params(REPO / "params.yaml", ["preset=debug"])
    assert (tiny["cycles"], tiny["initial_size"], tiny["budget"], tiny["subset_size"]) == (2, 40, 20, 200)
    assert (tiny["train"]["epochs"], tiny["train"]["min_steps"], tiny["train"]["milestones"]) == (3, 0, [2])
    assert tiny["cycles"] < full["cycles"] and tiny["train"]["epochs"] < full["train"]["epochs"]
    assert tiny["strategy"] == full["strategy"] and tiny["dataset"] == full["dataset"]


@pytest.mark.parametrize("file", PRESET_FILES, ids=lambda f: f.stem)
def test_every_preset_file_loads_validates_and_says_what_it_is(file):
    params = load_params(None, [f"preset={file.stem}"])  # validate() runs inside
    assert params["preset"] == file.stem
    text = file.read_text(encoding="utf-8")
    assert text.startswith("# "), f"{file.name} does not start with a comment saying what it is for"
    values = flatten(yaml.safe_load(text))
    assert "preset" not in values
    got = flatten(params)
    assert {k: got[k] for k in values} == values
    assert all(type(got[k]) is type(v) for k, v in values.items()), "a value typed unlike its default"


def test_presets_are_exactly_the_files():
    assert sorted(PRESETS) == sorted(f.stem for f in PRESET_FILES)


def test_packaged_defaults_are_what_load_params_returns():
    packaged = resources.files("tidal") / "params" / "default.yaml"
    assert packaged.is_file()
    defaults = yaml.safe_load(packaged.read_text(encoding="utf-8"))
    assert _typed(load_params(None, [])) == _typed(defaults) == _typed(DEFAULTS)


def test_default_numbers_are_not_read_as_strings():
    # YAML 1.1 reads 5e-4 as a string; in the defaults that would make the key a string key.
    for key, value in flatten(DEFAULTS).items():
        if isinstance(value, str):
            with pytest.raises(ValueError):
                float(value)


def test_the_repositorys_params_yaml_is_the_default_experiment():
    # `tidal run` here, `tidal run` anywhere else and `python -m tidal.bench` run one experiment.
    assert _typed(load_params(REPO / "params.yaml", [])) == _typed(load_params(None, []))


def test_params_yaml_names_only_the_keys_dvc_reads_from_it():
    """The defaults live once, in tidal/params/default.yaml: params.yaml writes only the keys that
    DVC needs in it (the ones dvc.yaml's stage names), not a second copy of the defaults."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["experiment"]
    file = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert sorted(file) == sorted(stage["params"])


def test_wheels_and_sdists_carry_every_params_file():
    """pyproject's package-data globs must match every file under tidal/params: without them
    an installed `tidal` has no defaults and no presets."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = config["package-data"]["tidal"]
    shipped = {p for g in globs for p in (REPO / "tidal").glob(g)}
    present = {p for p in PARAMS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert present and shipped == present
    packaged = resources.files("tidal") / "params"
    assert sorted(f.name for f in (packaged / "presets").iterdir() if f.name.endswith(".yaml")) == \
        [f.name for f in PRESET_FILES]


def test_yaml_scientific_notation_read_as_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-4 (no dot) as a string.
    path = _write(tmp_path, "train:\n  weight_decay: 5e-4\n  lr: 1e-2\n")
    params = load_params(path)
    assert isinstance(params["train"]["weight_decay"], float)
    assert params["train"]["weight_decay"] == pytest.approx(5e-4)
    assert isinstance(params["train"]["lr"], float)
    assert params["train"]["lr"] == pytest.approx(1e-2)


def test_numeric_string_not_coerced_where_string_expected(tmp_path):
    # coercion is only where a number is expected: a string key keeps the string
    params = load_params(_write(tmp_path, "experiment: '5e-4'\n"))
    assert params["experiment"] == "5e-4"


@pytest.mark.parametrize(
    "override, key",
    [
        ("strategy=bogus", "strategy"),
        ("dataset=bogus", "dataset"),
        ("budget=0", "budget"),
        ("subset_size=10", "subset_size"),  # smaller than budget
        ("train.lr=-1", "train.lr"),
        ("device=tpu", "device"),
        ("experiment=a/b", "experiment"),
    ],
)
def test_invalid_values_raise_naming_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_params(None, [override])
    assert f"'{key}'" in str(err.value)


def test_missing_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(_write(tmp_path, "- a\n- b\n"))


def test_load_params_does_not_mutate_defaults():
    before = repr(DEFAULTS)
    load_params(None, ["preset=debug", "train.epochs=2", "train.milestones=[1]"])
    assert repr(DEFAULTS) == before


def test_dvc_stage_names_every_params_key_that_changes_a_result():
    """`dvc repro` must rerun when any key of the experiment's fingerprint changes, and DVC
    needs every key the stage names to be present in params.yaml."""
    from tidal.experiment import RESUMABLE_KEYS

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["experiment"]
    named = set(stage["params"])
    file = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    fingerprint = [k for k in flatten(DEFAULTS)
                   if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_KEYS]
    missing = [k for k in fingerprint if k not in named and k.split(".")[0] not in named]
    assert not missing, f"dvc.yaml's experiment stage does not name {missing}"
    def present(key: str) -> bool:  # DVC's lookup: `train` is present as `train: {}`
        node = file
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    absent = [k for k in named if not present(k)]
    assert not absent, f"params.yaml lacks {absent}, which dvc.yaml names"


# --- names that become folders, override values that are not YAML (issue #31, items 4 and 7) ---

@pytest.mark.parametrize("name", ["digits-tidal", "a", "Exp_2.v3", "0", "grid-entropy-s1", "x" * 128])
def test_safe_experiment_names_are_accepted(name):
    assert load_params(None, [string_override("experiment", name)])["experiment"] == name


@pytest.mark.parametrize("name", [".", "..", "", " ", "a/b", "../x", "-x", ".hidden", "_x", "a b", "a\\b", "x\n",
                                  "é", "a:b", "a*", "x" * 129, "=1+17"])
def test_experiment_names_that_are_not_safe_folder_names_are_refused(name, tmp_path):
    """`experiment=..` made the repository root the workspace, `experiment=.` made runs/ it:
    the name is checked when params are read, from --set and from a params file alike."""
    with pytest.raises(ConfigError, match="'experiment'"):
        load_params(None, [string_override("experiment", name)])
    with pytest.raises(ConfigError, match="'experiment'"):
        load_params(_write(tmp_path, yaml.safe_dump({"experiment": name})))


def test_string_override_keeps_the_value_a_string():
    """`--experiment 2024` or `--experiment yes` names an experiment; YAML would read 2024 and true."""
    for name in ("2024", "yes", "007", "null", "1e3", "2024-01-01"):
        assert load_params(None, [string_override("experiment", name)])["experiment"] == name


@pytest.mark.parametrize("override", ["train.milestones=[1", "experiment={a", "strategy='x", "seed=@x",
                                      "experiment=a: b: c", "seed=!!python/object:os.system x"])
def test_override_that_is_not_yaml_is_one_config_error_naming_key_and_value(override):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as err:
        load_params(None, [override])
    message = str(err.value)
    assert f"'{key}'" in message and value in message and "\n" not in message


@pytest.mark.parametrize("override", ["=1", ".=1", "train.=1", "a..b=1", " =1"])
def test_override_without_a_key_is_a_config_error(override):
    with pytest.raises(ConfigError, match="key=value"):
        load_params(None, [override])


@pytest.mark.parametrize("value", ["[1]", "{a: 1}", "1", "true"])
def test_preset_that_is_not_a_name_is_a_config_error(value, tmp_path):
    with pytest.raises(ConfigError, match="'preset'"):
        load_params(None, [f"preset={value}"])
    with pytest.raises(ConfigError, match="'preset'"):
        load_params(_write(tmp_path, f"preset: {value}\n"))


@pytest.mark.parametrize("key", [k for k, v in flatten(DEFAULTS).items() if v is None])
@pytest.mark.parametrize("value", ["[1]", "{a: 1}", "5", "true"])
def test_a_key_whose_default_is_null_takes_a_string_or_null(key, value):
    """These keys name a preset, a file or an address; a list or a number crashed far from the input."""
    with pytest.raises(ConfigError, match=f"'{key}' must be a string or null"):
        load_params(None, [f"{key}={value}"])
    load_params(None, [f"{key}=null"])


def test_a_path_key_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """`--set data_root=~/photos` reaches tidal as it is under zsh, and a params file is never
    expanded by a shell: `~` is the home folder in every key that names a path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "lite0.pth").write_bytes(b"")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("runs_dir: ~/runs\n")
    params = load_params(params_file, ["data_root=~/photos", "backbone=timm/tf_efficientnet_lite0",
                                       "train.backbone_mode=frozen", "backbone_weights=~/lite0.pth"])
    home = str(tmp_path / "home")
    assert (params["data_root"], params["runs_dir"]) == (f"{home}/photos", f"{home}/runs")
    assert params["backbone_weights"] == f"{home}/lite0.pth"
    assert load_params(None, ["data_root=photos~1"])["data_root"] == "photos~1"  # only a leading ~
