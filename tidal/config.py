"""The one configuration: params.yaml, presets, and `--set key=value` overrides.

Every key is declared in DEFAULTS with its type; an unknown key or a value of the wrong
type is an error that names the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "experiment": "digits-tidal",
    "dataset": "digits",
    "data_root": "data",
    "runs_dir": "runs",
    "strategy": "tidal-entropy",
    "seed": 0,
    "cycles": 5,
    "initial_size": 100,
    "budget": 100,
    "subset_size": 500,
    "label_mode": "oracle",
    # Annotators who disagree on one id (import-labels): "refuse" (the id is not imported and stays
    # pending), "newest" (the newest answer wins) or "majority" (a tie is refused). See tidal/labels.py.
    "label_conflicts": "refuse",
    "imbalance_ratio": 1.0,
    "backbone": "small-cnn",
    "dropout": 0.0,  # dropout before the backbone's head while training (small-cnn, cifar-cnn); 0 = none
    "bald_passes": 10,  # bald: MC dropout passes T
    "bald_dropout": 0.5,  # bald: dropout rate on the head's input at scoring time
    "preset": None,
    "device": "auto",
    "tracking": True,
    "train": {
        "epochs": 40,
        "batch_size": 64,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "milestones": [30],
        "td_weight": 1.0,
        "crop_pad": 1,
        "hflip": False,
        "lloss_weight": 1.0,  # lloss: λ of the loss prediction module's margin ranking loss
        # lloss: the module's gradient stops reaching the backbone after this epoch (1-based,
        # literal: epochs > this are detached). The paper detaches after 120 of 200 epochs; every
        # preset keeps that ratio (0.6 × train.epochs), and min_steps scales it with the epochs.
        "lloss_detach_epoch": 24,
        # CUDA only: false, "default" or "reduce-overhead" (torch.compile of the backbone for
        # training). On CPU it is refused with an error: the CPU path stays deterministic fp32.
        "compile": False,
        # A cycle trains for at least this many optimizer steps: epochs are raised to reach it and
        # the milestones (and lloss_detach_epoch) scale with them, so 100 labels are trained as
        # long, in steps, as 10,000 (benchmarks/learner.py chose it on a validation split).
        "min_steps": 300,
        "schedule": "multistep",  # "multistep" (lr ×0.1 at each milestone) or "onecycle" (rise, then to 0)
        # Cycle k > 0 starts from cycle k-1's backbone and auxiliary module (new optimizer, schedule
        # from the start), as the TiDAL reference code trains; false trains fresh seeded models
        # every cycle (docs/architecture.md, "Models across cycles"). The committed results use false.
        "warm_start": False,
    },
    "score_batch_size": 512,
    # Training on several processes (torchrun + DistributedDataParallel, tidal/train_ddp.py).
    "distributed": {
        "nproc_per_node": 1,  # >1: the train step runs `torchrun --nproc-per-node N -m tidal.train_ddp`
        "backend": "auto",  # gloo on CPU, nccl on CUDA
        "timeout_s": 300,  # a rank that stops answering fails the whole run after this many seconds
    },
    # Scoring a large pool in shards, mapped as Prefect tasks (flows/experiment.py).
    "scoring": {
        "shards": 1,  # >1: candidates split into this many shards; each returns only its top-k
        "task_runner": "thread",  # "thread" (Prefect's default runner) or "dask" (prefect-dask)
        "dask_address": None,  # an existing Dask scheduler, e.g. tcp://10.0.0.5:8786; null = a LocalCluster
        "dask_workers": 2,  # LocalCluster workers when no address is given
    },
}

_PAPER: dict[str, Any] = {
    "dataset": "cifar10",
    "data_root": "datasets/torchvision",
    "backbone": "resnet18",
    "imbalance_ratio": 1.0,
    "cycles": 10,
    "initial_size": 1000,
    "budget": 1000,
    "subset_size": 10000,
    "train": {"epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
              "milestones": [160], "td_weight": 1.0, "crop_pad": 4, "hflip": True, "lloss_detach_epoch": 120,
              "min_steps": 0},
}

# A preset is a named set of values applied over the params file (so `--set preset=debug` makes
# any params.yaml tiny); `--set` overrides are applied last and win over the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny settings so CPU tests exercise every step in seconds.
    "debug": {
        "cycles": 2,
        "initial_size": 40,
        "budget": 20,
        "subset_size": 200,
        "train": {"epochs": 3, "batch_size": 32, "milestones": [2], "min_steps": 0, "lloss_detach_epoch": 2},
    },
    # The paper's protocol (DESIGN.md "Paper protocol"; hyperconnect/TiDAL main.py + config.py):
    # initial set = per-cycle budget (1,000 on CIFAR-10, 2,000 on CIFAR-100; half that on the
    # imbalanced variants), 10 cycles, a random subset of 10,000 unlabeled samples scored per
    # cycle, CIFAR ResNet-18, SGD 0.1 / 0.9 / 5e-4, batch 128, 200 epochs, lr x0.1 at 160
    # (the reference's second milestone, 260, is never reached), crop 32 pad 4 + flip.
    # Needs torchvision's files under datasets/torchvision/cifar10 (or cifar100); GPU-sized.
    # data_root is not `data/`: that directory is pinned by data.dvc (digits only), and any
    # extra file under it would break that pin.
    "paper-cifar10": {**_PAPER, "experiment": "paper-cifar10"},
    "paper-cifar100": {**_PAPER, "experiment": "paper-cifar100", "dataset": "cifar100",
                       "initial_size": 2000, "budget": 2000},
    "paper-cifar10-imb100": {**_PAPER, "experiment": "paper-cifar10-imb100", "imbalance_ratio": 100.0,
                             "initial_size": 500, "budget": 500},
    "paper-cifar100-imb100": {**_PAPER, "experiment": "paper-cifar100-imb100", "dataset": "cifar100",
                              "imbalance_ratio": 100.0, "initial_size": 1000, "budget": 1000},
    # CIFAR-10 on 2 CPU cores, from the JPEG image folder (the CIFAR-10 JPEG tarball cifar10-jpg.tar.gz
    # unpacked with `mkdir -p datasets/cifar10-jpg && tar xzf cifar10-jpg.tar.gz -C
    # datasets/cifar10-jpg --strip-components=1`, giving datasets/cifar10-jpg/{train,test}).
    # Cost per strategy and seed, measured: 310-398 s wall on the idle 2-core machine (the first
    # cell also decodes the 60k JPEGs into the tensor cache once), see benchmarks/README.md:
    #   python benchmarks/al_curves.py --name cifar10-cpu --strategies ... --seeds 0 --set preset=cpu-cifar10
    # Batch 64 so even 200 labels give 3+ steps per epoch.
    "cpu-cifar10": {
        "experiment": "cpu-cifar10",
        "dataset": "imagefolder",
        "data_root": "datasets/cifar10-jpg",
        "backbone": "small-cnn",
        "cycles": 4,
        "initial_size": 200,
        "budget": 200,
        "subset_size": 2000,
        "train": {"epochs": 15, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                  "milestones": [12], "crop_pad": 4, "hflip": True, "lloss_detach_epoch": 9, "min_steps": 0},
    },
    # CIFAR-10 on 2 CPU cores at 500 to 3,000 labels, where the learner reaches 45-65 % and
    # strategies can separate (cpu-cifar10's 200-800 labels stay at 21-36 %). Data as for
    # cpu-cifar10. cifar-cnn, one-cycle SGD to 0.05, batch 64, 30 epochs but at least 800 steps:
    # chosen on a validation split of the pool, never the test split (benchmarks/results/learner/).
    "cpu-cifar10-500": {
        "experiment": "cpu-cifar10-500",
        "dataset": "imagefolder",
        "data_root": "datasets/cifar10-jpg",
        "backbone": "cifar-cnn",
        "cycles": 6,
        "initial_size": 500,
        "budget": 500,
        "subset_size": 5000,
        "train": {"epochs": 30, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                  "milestones": [], "schedule": "onecycle", "min_steps": 800, "crop_pad": 4, "hflip": True,
                  "lloss_detach_epoch": 18},
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "label_mode": ("oracle", "human"),
    "label_conflicts": ("refuse", "newest", "majority"),
    "device": ("auto", "cpu", "cuda"),
    "distributed.backend": ("auto", "gloo", "nccl"),
    "train.schedule": ("multistep", "onecycle"),
    "scoring.task_runner": ("thread", "dask"),
}


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key."""


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
NULLABLE = {"preset", "subset_size", "scoring.dask_address"}

# Keys whose default is false but which may also be one of these strings.
FALSE_OR_CHOICE: dict[str, tuple[str, ...]] = {"train.compile": ("default", "reduce-overhead")}


def _check_type(name: str, default: Any, value: Any) -> Any:
    if value is None:
        if default is None or name in NULLABLE:
            return None
        raise ConfigError(f"params key '{name}' must not be empty or null")
    if default is None:
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
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    # Read as YAML (5 -> int, true -> bool, [30] -> list); number-like strings such as 5e-4
    # become floats later, only where the key expects a number (_coerce_numbers).
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


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
        if preset not in PRESETS:
            raise ConfigError(f"params key 'preset': unknown preset '{preset}'; "
                              f"choose one of {sorted(PRESETS)} or null")
        params = _merge(params, PRESETS[preset])
    params = _merge(params, override_values)
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
    need(params["backbone"] in BACKBONES, "backbone",
         f"must be one of {sorted(BACKBONES)}, got {params['backbone']!r}")
    need(isinstance(params["experiment"], str) and params["experiment"].strip() != ""
         and "/" not in params["experiment"], "experiment", "must be a non-empty name without '/'")
    for key in ("cycles", "initial_size", "budget", "score_batch_size"):
        need(params[key] >= 1, key, f"must be at least 1, got {params[key]}")
    need(params["subset_size"] is None or params["subset_size"] >= params["budget"], "subset_size",
         f"must be null (score every unlabeled sample) or at least budget={params['budget']}, "
         f"got {params['subset_size']}")
    need(params["imbalance_ratio"] >= 1, "imbalance_ratio", f"must be >= 1, got {params['imbalance_ratio']}")
    need(0 <= params["dropout"] < 1, "dropout", f"must be in [0, 1), got {params['dropout']}")
    need(params["dropout"] == 0 or params["backbone"] in ("small-cnn", "cifar-cnn"), "dropout",
         f"is only supported by backbones small-cnn and cifar-cnn, got backbone {params['backbone']!r}")
    need(params["bald_passes"] >= 1, "bald_passes", f"must be at least 1, got {params['bald_passes']}")
    need(0 < params["bald_dropout"] < 1, "bald_dropout", f"must be in (0, 1), got {params['bald_dropout']}")
    train = params["train"]
    for key in ("epochs", "batch_size"):
        need(train[key] >= 1, f"train.{key}", f"must be at least 1, got {train[key]}")
    need(train["min_steps"] >= 0, "train.min_steps", f"must be >= 0 (0: epochs as given), got {train['min_steps']}")
    need(train["lr"] > 0, "train.lr", f"must be positive, got {train['lr']}")
    need(train["td_weight"] >= 0, "train.td_weight", f"must be >= 0, got {train['td_weight']}")
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
