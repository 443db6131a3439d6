"""Prefect flows for an active-learning experiment.

Thin by design: each task calls one step of `tidal.pipeline` (or `tidal.experiment`,
`tidal.labeling.imports`, `tidal.tracking`) with params, paths and ids, never tensors or models,
and the steps themselves are resumable.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

import tidal.experiment
from tidal import pipeline, tracking
from tidal.config import string_override
from tidal.inputs import eval_split
from tidal.labeling import imports
from tidal.memory import peak_rss_mb
from tidal.workspace import ExperimentLock, read_json, workspace

def not_input_error(task: object, task_run: object, state: State) -> bool:
    """Retry what may pass by itself (a locked store, a slow disk), never bad input: a DataError,
    ConfigError or ExperimentMismatch fails the same way every time (all are ValueErrors)."""
    try:
        state.result()
    except ValueError:
        return False
    except BaseException:
        return True
    return True


# Tasks that touch the outside world (tracking store, files) retry briefly; training does not.
OUTSIDE = dict(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=not_input_error)
COMPUTE = dict(cache_policy=NO_CACHE)


@task(name="prepare-data", **OUTSIDE)
def prepare_data(params: dict) -> dict:
    return tidal.experiment.prepare_data(params)


@task(name="start-experiment", **OUTSIDE)
def start_experiment(params: dict, data_version: str, pool_version: str, overrides: list[str]) -> dict:
    state = tidal.experiment.start_experiment(params, data_version, pool_version, overrides)
    tracker = tracking.make_tracker(params["tracking"])
    parent = tracking.experiment_run(tracker, params, data_version, flow_run.get_id() or "")
    return {"cycle": state["cycle"], "n_labeled": len(state["labeled"]), "parent_run_id": parent}


@task(name="start-cycle-run", task_run_name="start-cycle-run-cycle-{cycle}", **OUTSIDE)
def start_cycle_run(params: dict, cycle: int, parent_run_id: str, prefect_flow_run_id: str) -> str:
    tracker = tracking.make_tracker(params["tracking"])
    return tracking.start_cycle_run(tracker, params, cycle, parent_run_id, prefect_flow_run_id)


@task(name="train", task_run_name="train-cycle-{cycle}", **COMPUTE)
def train(params: dict, cycle: int, run_id: str) -> dict:
    tracker = tracking.make_tracker(params["tracking"])
    with tracker.system_metrics(run_id):
        result = pipeline.train_step(params, cycle)
    # Also when resumed: a run killed between the checkpoint and this call logs them now (it
    # skips the epochs already logged).
    tracker.log_training(run_id, read_json(result["history"]))
    return result


@task(name="evaluate", task_run_name="evaluate-cycle-{cycle}", **COMPUTE)
def evaluate(params: dict, cycle: int, checkpoint: str) -> float:
    return pipeline.evaluate_step(params, cycle, checkpoint)


@task(name="score", task_run_name="score-cycle-{cycle}", **COMPUTE)
def score(params: dict, cycle: int, checkpoint: str) -> str:
    return pipeline.score_step(params, cycle, checkpoint)


@task(name="score-shard", task_run_name="score-shard-{shard}", **COMPUTE)
def score_shard(params: dict, cycle: int, checkpoint: str, shard: int, n_shards: int) -> dict:
    result = pipeline.score_shard_step(params, cycle, checkpoint, shard, n_shards)
    # The worker's peak memory so far: what shows scoring memory is flat in the pool size.
    return {**result, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


@task(name="merge-scores", task_run_name="merge-scores-cycle-{cycle}", **COMPUTE)
def merge_scores(params: dict, cycle: int, shards: list[dict]) -> str:
    return pipeline.merge_scores_step(params, cycle, [s["path"] for s in shards])


@flow(name="score-shards", flow_run_name="score-shards-cycle-{cycle}")
def score_shards(params: dict, cycle: int, checkpoint: str) -> dict:
    """Score the cycle's candidates in `scoring.shards` tasks mapped on this flow's task runner,
    then merge their top-k lists (here, not on a worker) into scores.csv.

    Returns {scores: path of scores.csv, shards: each shard task's result}.
    """
    n_shards = params["scoring"]["shards"]
    shards = score_shard.map(unmapped(params), cycle, unmapped(checkpoint), range(n_shards), n_shards).result()
    return {"scores": merge_scores(params, cycle, shards), "shards": shards}


def shard_runner(scoring: dict) -> TaskRunner:
    """The task runner `scoring.task_runner` names: threads here, or Dask workers (a LocalCluster
    of `dask_workers` processes, or the existing cluster at `dask_address`)."""
    if scoring["task_runner"] == "thread":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if scoring["dask_address"]:
        return DaskTaskRunner(address=scoring["dask_address"])
    # One thread per worker process: torch in each then uses one core (Dask sets OMP_NUM_THREADS=1).
    return DaskTaskRunner(cluster_kwargs={"n_workers": scoring["dask_workers"], "threads_per_worker": 1,
                                         "processes": True, "host": "127.0.0.1", "dashboard_address": None})


@contextmanager
def workers_see_this_api(scoring: dict) -> Iterator[None]:
    """Point Dask workers at the Prefect API this process uses.

    Task runs on a worker report to the API in the settings Prefect ships with them. Without
    PREFECT_API_URL this process runs a temporary server of its own and each worker would start
    another; its URL (127.0.0.1) serves the workers of a LocalCluster on this host, not remote ones.
    """
    if scoring["task_runner"] != "dask" or PREFECT_API_URL.value():
        yield
        return
    if scoring["dask_address"]:
        raise ValueError(f"scoring.dask_address={scoring['dask_address']}: Dask workers on other hosts need a "
                         f"Prefect server they can reach; set PREFECT_API_URL (e.g. run `prefect server start`)")
    with temporary_settings(updates={PREFECT_API_URL: str(get_client(sync_client=True).api_url)}):
        yield


def score_in_shards(params: dict, cycle: int, checkpoint: str) -> dict:
    """The `score-shards` flow on the task runner params choose (see score_shards)."""
    scoring = params["scoring"]
    with workers_see_this_api(scoring):
        return score_shards.with_options(task_runner=shard_runner(scoring))(params, cycle, checkpoint)


@task(name="select", **COMPUTE)
def select(scores_path: str, k: int) -> list[str]:
    return pipeline.select_step(scores_path, k)


@task(name="export-query", task_run_name="export-query-cycle-{cycle}", **OUTSIDE)
def export_query(params: dict, cycle: int, scores_path: str, ids: list[str]) -> str:
    return pipeline.export_query(params, cycle, scores_path, ids)


@task(name="push-query", task_run_name="push-query-cycle-{cycle}", **OUTSIDE)
def push_query(params: dict, cycle: int) -> dict | None:
    return pipeline.push_query(params, cycle)


@task(name="reveal-oracle-labels", **COMPUTE)
def reveal_oracle_labels(params: dict, ids: list[str]) -> dict[str, int]:
    return pipeline.reveal_oracle_labels(params, ids)


@task(name="log-cycle", task_run_name="log-cycle-cycle-{cycle}", **OUTSIDE)
def log_cycle(params: dict, run_id: str, parent_run_id: str, cycle: int, n_labeled: int,
              accuracy: float, query_path: str, checkpoint: str) -> None:
    tracking.log_cycle(tracking.make_tracker(params["tracking"]), params, run_id, parent_run_id, cycle, n_labeled,
                       accuracy, query_path, checkpoint)


@task(name="commit-cycle", task_run_name="commit-cycle-{cycle}", **OUTSIDE)
def commit_cycle(params: dict, cycle: int, accuracy: float, query_path: str,
                 labels: dict[str, int] | None, run_id: str, ids: list[str]) -> dict:
    return pipeline.commit_cycle(params, cycle, accuracy, query_path, labels,
                                 tracking={"mlflow_run_id": run_id,
                                           "prefect_flow_run_id": flow_run.get_id() or ""},
                                 queried_ids=ids)


@task(name="publish-learning-curve", **OUTSIDE)
def publish_learning_curve(params: dict) -> None:
    """A Prefect table artifact, so the Prefect UI shows the learning curve and the lineage."""
    state = tidal.experiment.load_state(params)
    rows = [{"cycle": h["cycle"], "n_labeled": h["n_labeled"], "accuracy": round(h["accuracy"], 4),
             "query": h["query"], "mlflow_run_id": h.get("mlflow_run_id", ""),
             "data_version": state["data_version"]} for h in state["history"]]
    create_table_artifact(table=rows, key=artifact_key(params["experiment"]),
                          description=f"Learning curve of {params['experiment']} "
                                      f"({params['strategy']}, seed {params['seed']}; accuracy on the "
                                      f"{eval_split(params)} split)")


def artifact_key(experiment: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "learning-curve-" + re.sub(r"[^a-z0-9-]+", "-", experiment.lower()).strip("-")


def run_cycle(params: dict, cycle: int, parent_run_id: str = "") -> dict:
    """Train on the current labels, evaluate, score and select, export the query, label it, commit.

    Plain tasks in the calling flow, named `<step>-cycle-<k>`, not a subflow per cycle: a flow
    run costs Prefect ~1.4 s here (creation, state calls, joining its heartbeat thread), a
    task run ~30 ms (the profile in benchmarks/README.md, overhead section)."""
    logger = get_run_logger()
    run_id = start_cycle_run(params, cycle, parent_run_id, flow_run.get_id() or "")
    n_labeled = len(tidal.experiment.load_state(params)["labeled"])
    trained = train(params, cycle, run_id)
    acc = evaluate(params, cycle, trained["checkpoint"])
    if params["scoring"]["shards"] == 1:
        scores = score(params, cycle, trained["checkpoint"])
    else:
        scores = score_in_shards(params, cycle, trained["checkpoint"])["scores"]
    ids = select(scores, params["budget"])
    query = export_query(params, cycle, scores, ids)
    if params["label_mode"] == "human":
        push_query(params, cycle)  # to Label Studio, when one is connected
    # Oracle: the data set's own labels now. Human: the query waits for annotators.
    labels = reveal_oracle_labels(params, ids) if params["label_mode"] == "oracle" else None
    log_cycle(params, run_id, parent_run_id, cycle, n_labeled, acc, query, trained["checkpoint"])
    record = commit_cycle(params, cycle, acc, query, labels, run_id, ids)
    publish_learning_curve(params)
    split = eval_split(params)  # the held-out part stands in for test
    logger.info("cycle %d: %d labeled, %s accuracy %.4f, query %s", cycle, n_labeled, split, acc, query)
    return record


def open_experiment(params: dict, overrides: list[str]) -> dict:
    """What every flow does first, under the experiment's lock: finish an import a crash left
    open, check the data against its pin (once per hold of the lock: the cycles that follow
    change no data, a label import inside a flow comes before this, and under `tidal run`,
    which holds the lock from its preflight on, the preflight's check is read), start or resume
    the workspace and its MLflow parent run. Returns start_experiment's record."""
    imports.finish_import(params, tracking.data_version_recorder(params))
    version = prepare_data(params)
    return start_experiment(params, version["data_version"], version["pool_version"], overrides)


@flow(name="tidal-experiment")
def experiment(params_path: str | None = "params.yaml", overrides: list[str] | None = None,
               params: dict | None = None) -> list[dict]:
    """Run (or resume) the experiment described by params.yaml plus `key=value` overrides.

    A deployment passes those two and the flow resolves them (tidal.experiment.experiment_params).
    `tidal run` has resolved them already, under the experiment's lock it holds through this flow:
    it passes the result, `params` and the overrides they came from, and nothing is resolved twice.
    """
    if params is None:
        params, overrides = tidal.experiment.experiment_params(params_path, overrides)
    with ExperimentLock(workspace(params).root):
        started = open_experiment(params, overrides)
        for cycle in range(started["cycle"], params["cycles"]):
            if _waiting(params):
                break
            run_cycle(params, cycle, started["parent_run_id"])
            if params["label_mode"] == "human":
                break  # the query is with the annotators: stop until labels are imported
        history = tidal.experiment.load_state(params)["history"]
        if started["parent_run_id"] and not imports.waiting_for_labels(params):
            tracking.make_tracker(params["tracking"]).end_run(started["parent_run_id"])
    return history


def _waiting(params: dict) -> bool:
    waiting = imports.waiting_for_labels(params)
    if waiting:
        get_run_logger().warning(
            "waiting for labels of query %s (%d pending): annotate %s and run `tidal import-labels FILE`",
            waiting["query_id"], waiting["n_pending"], waiting["query"])
    return bool(waiting)



@flow(name="al-cycle")
def al_cycle(params_path: str | None = "params.yaml", overrides: list[str] | None = None) -> dict:
    """One more cycle of the experiment, whatever `cycles` says: train on the current labels,
    score, select and export the next query. This is the flow to schedule (prefect.yaml)."""
    params, overrides = tidal.experiment.experiment_params(params_path, overrides)
    with ExperimentLock(workspace(params).root):
        started = open_experiment(params, overrides)
        if _waiting(params):
            return {"waiting_for_labels": imports.waiting_for_labels(params)}
        return run_cycle(params, started["cycle"], started["parent_run_id"])


LABELS_ARRIVED = "tidal.labels.arrived"  # the event flows/listener.py emits; prefect.yaml's trigger expects it


@task(name="pull-labels", **OUTSIDE)
def pull_labels(params: dict, file: str | None) -> dict:
    """Label Studio's answers (or a labels file from the inbox), through import-labels' rules;
    `ready` when `labelstudio.min_new` of the last query's ids are answered (or all of them).

    Label Studio keeps answers until enough are in; a file is imported whole at once (what it
    holds is saved), and the next cycle waits until the files so far answer enough."""
    on_version = tracking.data_version_recorder(params)
    if file:
        imported = [imports.import_labels(params, file, on_version=on_version)]
        progress = imports.query_progress(params)
        return {"ready": progress["answered"] >= progress["needed"], "imports": imported, **progress}
    pulled = imports.pull_labels(params, on_version=on_version)
    return {"ready": pulled["imported"], **pulled}


@flow(name="labels-arrived")
def labels_arrived(experiment: str, params_path: str | None = "params.yaml", overrides: list[str] | None = None,
                   file: str | None = None, wait_s: float = 3600) -> dict:
    """Labels came back (a Label Studio webhook, or a file dropped in the inbox): import them and,
    when `labelstudio.min_new` are in (default: the whole query), run the next cycle.

    Exactly once: every delivery of the event starts this flow, but the experiment lock lets one
    run at a time (a later one waits up to `wait_s` for it), and the state decides: once a cycle
    has run on the labels, its new query is pending and a second delivery finds nothing to import.
    A delivery that finds too few answers leaves them in Label Studio for the next one."""
    params, overrides = tidal.experiment.experiment_params(
        params_path, list(overrides or []) + [string_override("experiment", experiment)])
    logger = get_run_logger()
    with ExperimentLock(workspace(params).root, wait_s=wait_s):
        pulled = pull_labels(params, file)
        if not pulled["ready"]:
            logger.info("%d of %d pending id(s) answered, %d needed: no cycle yet", pulled["answered"],
                        pulled["pending"], pulled["needed"])
            return {"cycle": None, **pulled}
        started = open_experiment(params, overrides)
        if _waiting(params):
            return {"cycle": None, **pulled}
        record = run_cycle(params, started["cycle"], started["parent_run_id"])
        return {"cycle": record["cycle"], **pulled}
