"""The only module that talks to MLflow.

One parent run per experiment (params, data version), one child run per cycle (per-epoch
train metrics, accuracy, n_labeled, the query and the checkpoint as artifacts, and the
cycle's model as a LoggedModel `cycle-<k>` with the cycle's metrics linked to it). The
parent also gets accuracy with step = n_labeled, so the MLflow UI's chart compares
strategies on the budget axis, and the tag `tidal.eval_split` (EVAL_SPLIT_TAG): the split
the accuracy is measured on, test or validation (`validation_size` > 0). Every call names its
run id explicitly: MLflow's active run is thread-local and Prefect runs tasks in worker threads.

`mlflow` is imported lazily so that the library trains on a box without it (tracking off).
"""
from __future__ import annotations

import fnmatch
import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from tidal.workspace import workspace

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHECKPOINT_DIR = "checkpoint"
MODEL_SPEC_TAG = "tidal.model_spec"
RUN_KEY_TAG = "tidal.run_key"  # the workspace's key for its parent run, saved before the run exists
EXPERIMENT_TAG = "tidal.experiment"  # on every run: the experiment it belongs to (a study holds several)
EVAL_SPLIT_TAG = "tidal.eval_split"  # on the parent run: "test" or "validation", what `accuracy` is measured on


def mlflow_experiment(params: dict[str, Any]) -> str:
    """The MLflow experiment an experiment's runs go to: its study, else its own name."""
    return params.get("study") or params["experiment"]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def _every_page(search: Callable[..., Any], **kwargs: Any) -> list:
    """All results of an MLflow client search, page after page (each page holds max_results)."""
    results, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        results += list(page)
        if not (token := page.token):
            return results


class MlflowTracker:
    enabled = True

    def __init__(self, uri: str | None = None) -> None:
        # No usage reports from an offline pipeline.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow import MlflowClient

        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _existing_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        """The run carrying all of `tags`, if one exists: a run created by a process killed before
        its id was saved in the workspace is found again instead of left behind as an orphan."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([experiment_id], filter_string=query, max_results=1,
                                        order_by=["attributes.start_time ASC"])
        return found[0].info.run_id if found else None

    def start_parent_run(self, params: dict[str, Any], data_version: str, prefect_flow_run_id: str = "",
                         run_key: str = "", pool_version: str = "") -> str:
        """Create the parent run, or find the one tagged with `run_key`; return its id. Its params
        are every params key plus data_version (the experiment's pool and labels) and pool_version
        (the pool's content alone, which `tidal compare` needs equal across the runs it averages)."""
        from tidal.config import flatten
        from tidal.inputs import eval_split

        experiment_id = self._experiment_id(mlflow_experiment(params))
        if run_key and (found := self._existing_run(experiment_id, {RUN_KEY_TAG: run_key})):
            return found
        run = self.client.create_run(
            experiment_id,
            run_name=f"{params['strategy']}-seed{params['seed']}",
            tags={"strategy": params["strategy"], "dataset": params["dataset"], EXPERIMENT_TAG: params["experiment"],
                  "data_version": data_version, "tidal.kind": "experiment",
                  "prefect.flow_run_id": prefect_flow_run_id, RUN_KEY_TAG: run_key,
                  EVAL_SPLIT_TAG: eval_split(params)})
        flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
        flat["data_version"] = data_version
        if pool_version:
            flat["pool_version"] = pool_version
        self._log(run.info.run_id, params=flat)
        return run.info.run_id

    def start_cycle(self, parent_run_id: str, experiment: str, cycle: int, n_labeled: int,
                    prefect_flow_run_id: str = "") -> str:
        """Create the cycle's child run, or find the one already under the parent; return its id."""
        parent = self.client.get_run(parent_run_id)
        found = self._existing_run(parent.info.experiment_id,
                                   {"mlflow.parentRunId": parent_run_id, "cycle": str(cycle)})
        if found:
            return found
        run = self.client.create_run(
            parent.info.experiment_id, run_name=f"cycle-{cycle}",
            tags={"mlflow.parentRunId": parent_run_id, "cycle": str(cycle), "tidal.kind": "cycle",
                  EXPERIMENT_TAG: experiment, "data_version": parent.data.tags.get("data_version", ""),
                  "strategy": parent.data.tags.get("strategy", ""),
                  "prefect.flow_run_id": prefect_flow_run_id})
        self._log(run.info.run_id, params={"cycle": cycle, "n_labeled": n_labeled})
        return run.info.run_id

    def log_training(self, run_id: str, history: list[dict]) -> None:
        """Per-epoch train loss, accuracy, TD-module KL and learning rate, in one batch."""
        metrics = []
        for record in history:
            for key in ("loss", "accuracy", "td_kl", "lr"):
                metrics.append((f"train_{key}" if key != "td_kl" else "module_kl_loss", record[key],
                                record["epoch"]))
        self._log(run_id, metrics=self._not_logged(run_id, metrics))

    def log_cycle_result(self, run_id: str, parent_run_id: str, cycle: int, n_labeled: int,
                         accuracy: float, query_path: str, model_id: str | None = None) -> None:
        """The cycle run's accuracy and n_labeled (linked to its LoggedModel `model_id`, so the
        Models view shows them), the query, and the parent's curve point. Idempotent: a cycle
        redone after a crash logs no metric step a second time."""
        self._log(run_id, metrics=self._not_logged(
            run_id, [("accuracy", accuracy, cycle), ("n_labeled", n_labeled, cycle)]), model_id=model_id)
        self.client.log_artifact(run_id, query_path, artifact_path="query")
        self._log(parent_run_id, metrics=self._not_logged(
            parent_run_id, [("accuracy", accuracy, n_labeled), ("accuracy_by_cycle", accuracy, cycle)]))

    def _not_logged(self, run_id: str, metrics: list[tuple]) -> list[tuple]:
        """The (key, value, step) metrics whose key has no value at that step in the run yet."""
        logged = {key: {m.step for m in self.client.get_metric_history(run_id, key)}
                  for key in {key for key, _, _ in metrics}}
        return [(key, value, step) for key, value, step in metrics if int(step) not in logged[key]]

    def log_checkpoint(self, run_id: str, checkpoint: str | Path, spec: dict[str, Any]) -> None:
        """The cycle's checkpoint as an artifact (backbone and auxiliary module: what resumes or
        re-scores the cycle elsewhere), and the spec that rebuilds its classifier."""
        self.client.log_artifact(run_id, str(checkpoint), artifact_path=CHECKPOINT_DIR)
        self.client.set_tag(run_id, MODEL_SPEC_TAG, json.dumps(spec))

    def log_cycle_model(self, run_id: str, checkpoint: str | Path, spec: dict[str, Any], cycle: int) -> str:
        """The cycle's classifier as the run's MLflow LoggedModel `cycle-<k>`; returns its model id.

        Pickle format: 1.2 % of the default experiment's time for its 5 cycles, against 4.6 % for
        pt2 (torch.export), once MLflow's imports are paid (benchmarks/model_logging.py,
        results/model_logging); it loads with `mlflow.pytorch.load_model` wherever `tidal` is
        installed. A model the run already has (a cycle redone after a crash) is returned.
        """
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        found = self._cycle_models(run_id)
        if found and found[0].status == LoggedModelStatus.READY:
            return found[0].model_id
        if found:  # created, but the process died before its files were uploaded
            model = found[0]
        else:
            # Created here, not by log_model inside the run: log_model would also link every metric
            # the run has at the model's step (a training epoch's, a system sample's) to the model.
            model = self.client.create_logged_model(
                self.client.get_run(run_id).info.experiment_id, name=f"cycle-{cycle}", source_run_id=run_id,
                tags={"cycle": str(cycle), "tidal.kind": "cycle-model"},
                params={"backbone": spec["backbone"], "cycle": str(cycle)})
            from tidal.faults import failpoint

            failpoint("tracking:model-created")
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.log_model(None, checkpoint_backbone(spec, saved), example_batch(spec), serialization_format="pickle",
                       model_id=model.model_id)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=cycle)])
        return model.model_id

    def _cycle_models(self, run_id: str) -> list[Any]:
        run = self.client.get_run(run_id)
        return list(self.client.search_logged_models([run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'"))

    def _log_model_from_checkpoint(self, run: Any) -> str:
        """Rebuild a cycle's classifier from its logged checkpoint and log it as an MLflow model
        (pt2): for cycle runs logged without a model of their own."""
        import tempfile

        import torch

        spec_text = run.data.tags.get(MODEL_SPEC_TAG)
        if spec_text is None:
            raise ValueError(f"cycle run {run.info.run_id} has neither a logged model nor a checkpoint "
                             f"(tag {MODEL_SPEC_TAG}); was the cycle logged?")
        spec = json.loads(spec_text)
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run.info.run_id, f"{CHECKPOINT_DIR}/model.pt", tmp)
            saved = torch.load(path, map_location="cpu", weights_only=True)
        return self.log_model(run.info.run_id, checkpoint_backbone(spec, saved), example_batch(spec)).model_uri

    def log_model(self, run_id: str | None, backbone: Any, example_input: Any, serialization_format: str = "pt2",
                  model_id: str | None = None) -> Any:
        """Log a classifier (`tidal.models.classifier.Classifier`) as an MLflow PyTorch model with
        its signature, in run `run_id` or into the LoggedModel `model_id`; returns MLflow's
        ModelInfo (model_uri, model_id)."""
        import logging

        import numpy as np
        import torch
        from mlflow.models import infer_signature

        from tidal.models.classifier import Classifier

        model = Classifier(backbone.cpu().eval())
        with torch.inference_mode():
            out = model(example_input)
        signature = infer_signature(np.asarray(example_input), out.numpy())
        pt2 = serialization_format == "pt2"
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        if not pt2:
            quiet.setLevel(logging.ERROR)  # its warning on pickle, once per cycle; the docstring says why
        run = self._mlflow.start_run(run_id=run_id) if run_id else nullcontext()
        try:
            with run:
                return self._mlflow.pytorch.log_model(
                    model, name="model", signature=signature, model_id=model_id,
                    serialization_format=serialization_format,
                    # Explicit requirements: inferring them spawns a slow subprocess per model.
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    # pt2 traces the model on the example; MLflow would then reload the saved model
                    # and run the example through it: 0.2 s a cycle plus ~5 s of imports on the
                    # first (benchmarks/overhead.py). The signature stays; tests/integration/
                    # test_flow.py loads logged models and predicts instead.
                    **({"input_example": np.asarray(example_input), "validate_serving_input": False} if pt2 else {}))
        finally:
            quiet.setLevel(level)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def record_data_version(self, parent_run_id: str, data_version: str) -> None:
        """A label import made a new data version: the parent run's tag follows it (later cycle
        runs copy it), and `data_version.<n>` keeps every version the experiment went through."""
        tags = self.client.get_run(parent_run_id).data.tags
        if tags.get("data_version") == data_version:
            return  # recorded already (an import finished again after a crash)
        n = sum(1 for k in tags if k.startswith("data_version."))
        self.client.set_tag(parent_run_id, "data_version", data_version)
        self.client.set_tag(parent_run_id, f"data_version.{n + 1}", data_version)

    @contextmanager
    def system_metrics(self, run_id: str, interval_s: float = 2.0) -> Iterator[None]:
        """Sample CPU, memory (and GPU, when present) into the run while the block runs."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1, resume_logging=True,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def learning_curves(self, experiments: list[str] | None = None) -> tuple[list[dict], list[str]]:
        """Every experiment parent run's accuracy by number of labels, as plain rows (each
        with its run's flat `params`), and the runs left out. An experiment started over (its
        workspace deleted, the MLflow experiment kept) holds an older parent run of the same
        strategy and seed: only the newest counts; the others come back as "experiment/run id"."""
        # Every page: a store holding one experiment per grid cell can have thousands.
        found = _every_page(self.client.search_experiments, max_results=1000)
        if experiments:  # names or shell-style patterns: grid-* is every experiment of a grid
            by_name = {e.name: e for e in found}
            chosen = {p: fnmatch.filter(sorted(by_name), p) for p in experiments}
            missing = [p for p, names in chosen.items() if not names]
            if missing:
                raise ValueError(f"no MLflow experiment named {missing} at {self.uri}")
            found = [by_name[n] for n in dict.fromkeys(n for names in chosen.values() for n in names)]
        ids = [e.experiment_id for e in found]
        rows: list[dict] = []
        superseded: list[str] = []
        if not ids:
            return rows, superseded
        names = {e.experiment_id: e.name for e in found}
        parents = _every_page(self.client.search_runs, experiment_ids=ids,
                              filter_string="tags.`tidal.kind` = 'experiment'", max_results=5000,
                              order_by=["attributes.start_time DESC"])
        newest: dict[tuple[str, str, int], Any] = {}
        for run in parents:
            # the experiment a run belongs to: its tag (a study holds several), else its MLflow experiment
            experiment = run.data.tags.get(EXPERIMENT_TAG) or names[run.info.experiment_id]
            key = (experiment, run.data.params.get("strategy", "?"), int(run.data.params.get("seed", 0)))
            if key in newest:
                superseded.append(f"{experiment}/{run.info.run_id}")
            else:
                newest[key] = run
        for (experiment, strategy, seed), run in newest.items():
            for m in self.client.get_metric_history(run.info.run_id, "accuracy"):
                rows.append({"experiment": experiment, "strategy": strategy, "seed": seed, "n_labeled": m.step,
                             "accuracy": m.value, "run_id": run.info.run_id,
                             "experiment_id": run.info.experiment_id, "params": run.data.params})
        return rows, superseded

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """A run's page in the MLflow UI: on the tracking server itself, or at `mlflow ui`'s
        default address for a local store."""
        ui = self.uri.rstrip("/") if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"

    def log_report(self, files: list[str | Path], experiment: str = "tidal-comparisons") -> str:
        """Log a comparison report's files as artifacts of a new run; return its id."""
        run = self.client.create_run(self._experiment_id(experiment), run_name=time.strftime("compare-%Y%m%d-%H%M%S"),
                                     tags={"tidal.kind": "comparison"})
        for path in files:
            self.client.log_artifact(run.info.run_id, str(path))
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def register_cycle_model(self, experiment: str, registered_name: str, alias: str, pick: str = "best") -> str:
        """Register one cycle's model of an experiment (the best accuracy, or the last
        cycle) and point `alias` at it; return `models:/<name>@<alias>`."""
        cycles = self._cycle_runs(experiment)
        cycles = [r for r in cycles if "accuracy" in r.data.metrics]
        if not cycles:
            raise ValueError(f"experiment '{experiment}' has no finished cycle with a model yet")
        if pick == "best":
            chosen = max(cycles, key=lambda r: (r.data.metrics["accuracy"], int(r.data.tags["cycle"])))
        elif pick == "last":
            chosen = max(cycles, key=lambda r: int(r.data.tags["cycle"]))
        else:
            raise ValueError(f"pick must be 'best' or 'last', got {pick!r}")
        models = self.client.search_logged_models(
            experiment_ids=[chosen.info.experiment_id], filter_string=f"source_run_id = '{chosen.info.run_id}'")
        model_uri = models[0].model_uri if models else self._log_model_from_checkpoint(chosen)
        version = self._mlflow.register_model(model_uri, registered_name)
        self.client.set_registered_model_alias(registered_name, alias, version.version)
        return f"models:/{registered_name}@{alias}"

    def _cycle_runs(self, experiment: str) -> list[Any]:
        """The cycle runs of a tidal experiment, in its study or in the MLflow experiment of its name."""
        ids = [e.experiment_id for e in _every_page(self.client.search_experiments, max_results=1000)]
        tagged = _every_page(self.client.search_runs, experiment_ids=ids, max_results=5000,
                             filter_string=f"tags.`tidal.kind` = 'cycle' and tags.`{EXPERIMENT_TAG}` = '{experiment}'")
        if tagged:
            return tagged
        exp = self.client.get_experiment_by_name(experiment)  # runs logged without the tag
        if exp is None:
            raise ValueError(f"no MLflow experiment named '{experiment}' at {self.uri}")
        return self.client.search_runs([exp.experiment_id], filter_string="tags.`tidal.kind` = 'cycle'",
                                       max_results=5000)

    def _log(self, run_id: str, params: dict | None = None, metrics: list[tuple] | None = None,
             model_id: str | None = None) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        p = [Param(k, str(v)) for k, v in (params or {}).items()]
        m = [Metric(k, float(v), now, int(step), model_id=model_id) for k, v, step in (metrics or [])]
        # MLflow accepts at most 100 params and 1000 metrics per batch.
        for i in range(0, len(p), 100):
            self.client.log_batch(run_id, params=p[i:i + 100])
        for i in range(0, len(m), 1000):
            self.client.log_batch(run_id, metrics=m[i:i + 1000])


class NullTracker:
    """Tracking off (a bare GPU box, quick checks): same calls, nothing recorded."""

    uri = "none"
    enabled = False

    def start_parent_run(self, params: dict[str, Any], data_version: str, prefect_flow_run_id: str = "",
                         run_key: str = "", pool_version: str = "") -> str:
        return ""

    def start_cycle(self, parent_run_id: str, experiment: str, cycle: int, n_labeled: int,
                    prefect_flow_run_id: str = "") -> str:
        return ""

    def log_training(self, run_id: str, history: list[dict]) -> None:
        pass

    def log_cycle_result(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_checkpoint(self, run_id: str, checkpoint: str | Path, spec: dict[str, Any]) -> None:
        pass

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    def record_data_version(self, parent_run_id: str, data_version: str) -> None:
        pass

    @contextmanager
    def system_metrics(self, run_id: str, interval_s: float = 2.0) -> Iterator[None]:
        yield


Tracker = MlflowTracker | NullTracker


def make_tracker(enabled: bool = True) -> Tracker:
    """The one switch for tracking: pass `params["tracking"]`; off gives the NullTracker."""
    return MlflowTracker() if enabled else NullTracker()


# --- run ids kept in the workspace, so a resumed experiment logs into the same runs ---------------

def _state(params: dict) -> dict[str, Any]:
    return workspace(params).load_state()


def _remember(params: dict, key: str, value: Any) -> None:
    """Keep a tracking id (the parent run, a cycle's run) in state.json, for resumes."""
    ws = workspace(params)
    state = ws.load_state()
    state["tracking"][key] = value
    ws.save_state(state)


def experiment_run(tracker: Tracker, params: dict, data_version: str, prefect_flow_run_id: str = "") -> str:
    """The experiment's parent run id: the one state.json records, else found or created.

    Its key is saved before the run exists, so a process killed in between finds that run
    again instead of leaving it behind. "" with tracking off.
    """
    import uuid

    from tidal.faults import failpoint

    saved = _state(params)["tracking"]
    if not tracker.enabled or saved.get("parent_run_id"):
        return saved.get("parent_run_id", "")
    run_key = saved.get("run_key")
    if not run_key:
        run_key = uuid.uuid4().hex
        _remember(params, "run_key", run_key)
    parent = tracker.start_parent_run(params, data_version, prefect_flow_run_id=prefect_flow_run_id, run_key=run_key,
                                      pool_version=str(_state(params)["pool_version"]))
    failpoint("tracking:parent-created")
    _remember(params, "parent_run_id", parent)
    return parent


def start_cycle_run(tracker: Tracker, params: dict, cycle: int, parent_run_id: str, prefect_flow_run_id: str = "") -> str:
    """The cycle's child run id: the one state.json records, else found under the parent or
    created. "" with tracking off."""
    from tidal.faults import failpoint

    state = _state(params)
    runs = state["tracking"].get("cycle_runs", {})
    if not tracker.enabled or str(cycle) in runs:
        return runs.get(str(cycle), "")
    run_id = tracker.start_cycle(parent_run_id, params["experiment"], cycle, len(state["labeled"]),
                                 prefect_flow_run_id=prefect_flow_run_id)
    failpoint("tracking:cycle-created")
    _remember(params, "cycle_runs", {**runs, str(cycle): run_id})
    return run_id


def log_cycle(tracker: Tracker, params: dict, run_id: str, parent_run_id: str, cycle: int, n_labeled: int,
              accuracy: float, query_path: str, checkpoint: str) -> None:
    """The cycle's model, results (linked to the model), query and checkpoint on its run, which
    then ends; safe to repeat."""
    if not tracker.enabled:
        return
    spec = checkpoint_spec(checkpoint)
    model_id = tracker.log_cycle_model(run_id, checkpoint, spec, cycle)
    tracker.log_cycle_result(run_id, parent_run_id, cycle, n_labeled, accuracy, query_path, model_id=model_id)
    tracker.log_checkpoint(run_id, checkpoint, spec)
    tracker.end_run(run_id)
    from tidal.faults import failpoint

    failpoint("tracking:cycle-logged")


def data_version_recorder(params: dict) -> Callable[[str], None]:
    """What a label import calls with its new data version: the experiment's MLflow parent run
    records it (nothing with tracking off or before the parent run exists; MLflow is imported
    only then, so an import without tracking stays fast)."""
    def record(data_version: str) -> None:

        parent = _state(params)["tracking"].get("parent_run_id")
        if parent:
            make_tracker(params["tracking"]).record_data_version(parent, data_version)
    return record


def checkpoint_spec(checkpoint: str | Path) -> dict[str, Any]:
    """What rebuilds the checkpoint's classifier, read from the checkpoint itself (so logging does
    not load the data set each cycle)."""
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True)["spec"]


def checkpoint_backbone(spec: dict[str, Any], saved: dict[str, Any]) -> Any:
    """The classifier of a cycle checkpoint (`torch.load` of model.pt, `saved`), built from its
    spec (checkpoint_spec), for `log_model`."""
    from tidal.models import build_backbone

    backbone = build_backbone(spec["backbone"], spec["in_shape"][0], spec["num_classes"], dropout=spec["dropout"])
    backbone.load_state_dict(saved["backbone"])
    return backbone


def example_batch(spec: dict[str, Any]) -> Any:
    """Two seeded random inputs of the spec's shape: the example `log_model` infers the signature from."""
    import torch

    return torch.rand(2, *spec["in_shape"], generator=torch.Generator().manual_seed(0))
