"""`tidal` command line: run the experiment flow, show a workspace's state, write the data."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tidal.config import ConfigError, check_name, load_params, string_override
from tidal.signals import exit_on_sigterm

DEFAULT_PARAMS = "params.yaml"


def _params_path(arg: str | None) -> str | None:
    if arg is not None:
        return arg
    return DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None


def _offline_defaults() -> None:
    """Prefect's temporary server takes ~15 s to start on 2 cores; its default timeout is 20 s."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _accuracy_header(split: str) -> str:
    """The accuracy column's header: the split it was measured on (tidal.inputs.eval_split)."""
    return f"{split} accuracy"


def format_curve(history: list[dict], split: str) -> str:
    head = f"{'cycle':>5}  {'n_labeled':>9}  {_accuracy_header(split):>19}"
    lines = [head, "-" * len(head)]
    lines += [f"{h['cycle']:>5}  {h['n_labeled']:>9}  {h['accuracy']:>19.4f}" for h in history]
    return "\n".join(lines)


def format_lineage(history: list[dict], data_version: str, split: str) -> str:
    """The learning curve with, per cycle, the ids that find it in Prefect, MLflow and DVC."""
    head = (f"{'cycle':>5}  {'n_labeled':>9}  {_accuracy_header(split):>19}  {'prefect flow run':<36}  "
            f"{'mlflow run':<32}  data version")
    lines = [head, "-" * len(head)]
    for h in history:
        lines.append(f"{h['cycle']:>5}  {h['n_labeled']:>9}  {h['accuracy']:>19.4f}  "
                     f"{h.get('prefect_flow_run_id') or '-':<36}  {h.get('mlflow_run_id') or '-':<32}  "
                     f"{data_version}")
    return "\n".join(lines)


def _resolved(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The params of the experiment the command names, and the overrides they come from (its
    recorded ones applied again under --set): tidal.experiment.experiment_params."""
    from tidal.experiment import experiment_params

    # --experiment is a name, taken as it is (string_override), not YAML; load_params checks it.
    named = getattr(args, "experiment", None)
    overrides = list(args.set) + ([string_override("experiment", named)] if named is not None else [])
    return experiment_params(_params_path(args.params), overrides)


def _experiment_params(args: argparse.Namespace) -> dict:
    return _resolved(args)[0]


def next_command(params: dict, command: str) -> str:
    """`tidal COMMAND` as it must be typed to reach this experiment from here."""
    try:
        found = load_params(_params_path(None), [])  # what the bare command would find
    except ConfigError:
        found = {"experiment": None, "runs_dir": None}
    parts = [f"tidal {command}"]
    if params["experiment"] != found["experiment"]:
        parts.append(f"--set experiment={params['experiment']}" if command == "run"
                     else f"--experiment {params['experiment']}")
    if params["runs_dir"] != found["runs_dir"]:
        parts.append(f"--set runs_dir={params['runs_dir']}")
    return " ".join(parts)


def cmd_run(args: argparse.Namespace) -> int:
    params, overrides = _resolved(args)  # fail fast, before Prefect starts
    from tidal.experiment import preflight
    from tidal.tracking import data_version_recorder
    from tidal.workspace import ExperimentLock, workspace

    with ExperimentLock(workspace(params).root):  # held through the flow, whose own lock enters again
        preflight(params, data_version_recorder(params))
        _offline_defaults()
        from flows.experiment import experiment

        start = time.perf_counter()
        # The flow gets the params resolved here, under this lock, and does not resolve them again.
        history = experiment(params_path=_params_path(args.params), overrides=overrides, params=params)
        elapsed = time.perf_counter() - start
    from tidal.workspace import workspace
    from tidal.tracking import tracking_uri

    ws = workspace(params)
    from tidal.labeling.imports import waiting_for_labels

    waiting = waiting_for_labels(params)
    done = "is waiting for labels after" if waiting else "finished in"
    print(f"\nExperiment '{params['experiment']}' ({params['strategy']}, seed {params['seed']}) "
          f"{done} {elapsed:.0f} s\n")
    from tidal.inputs import eval_split

    print(format_curve(history, eval_split(params)))
    last_query = history[-1]["query"] if history else "(none)"
    print(f"\nlearning curve:  {ws.learning_curve_path}")
    print(f"last query:      {last_query}")
    if params["tracking"]:
        uri = tracking_uri()
        print(f"open MLflow:     mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite")
              else f"open MLflow:     {uri}")
    print(f"state:           {next_command(params, 'status')}")
    if waiting:
        _print_waiting(waiting, params)
    return 0


def _print_waiting(waiting: dict, params: dict) -> None:
    query = Path(waiting["query"])
    print(f"\nWAITING FOR LABELS: query {waiting['query_id']} ({waiting['n_pending']} samples pending)")
    print(f"  annotate:  {query}  (fill the `label` column; or {query.with_suffix('.jsonl').name}, "
          f"or import {query.parent / 'query_labelstudio.json'} into Label Studio)")
    importer = next_command(params, "import-labels").replace("import-labels", "import-labels FILE", 1)
    print(f"  then:      {importer}")
    print(f"  and:       {next_command(params, 'run')}   (the next cycle trains on the new labels)")


def cmd_status(args: argparse.Namespace) -> int:
    params = _experiment_params(args)
    from tidal.workspace import workspace

    ws = workspace(params)
    if ws.exists() and args.history:
        return _print_history(params, args.history)
    if not ws.exists():
        others = sorted(p.parent.name for p in ws.root.parent.glob("*/state.json"))
        hint = f" (experiments there: {', '.join(others)}; pick one with --experiment NAME)" if others else ""
        print(f"no experiment '{params['experiment']}' under {ws.root.parent}/{hint}; start it with `tidal run`",
              file=sys.stderr)
        return 1
    state = ws.load_state()
    n_labeled = len(state["labeled"])
    history = state["history"]
    print(f"experiment:   {state['experiment']}  ({ws.root})")
    print(f"strategy:     {state['strategy']}   seed: {state['seed']}   dataset: {state['dataset']}")
    print(f"data version: {state['data_version']}")
    print(f"cycle:        {state['cycle']} done of {params['cycles']} planned")
    print(f"labeled:      {n_labeled}   unlabeled: {state['pool_size'] - n_labeled}")
    if state["skipped_images"]:
        print(f"skipped:      {state['skipped_images']} image file(s) that cannot be decoded, left out of the "
              f"pool and test split (bad_images: skip): {ws.skipped_images_path}")
    if history:
        from tidal.inputs import eval_split

        split = eval_split(params)
        views = ", on each image and its mirror" if params["eval_hflip"] else ""
        print(f"last {split} accuracy: {history[-1]['accuracy']:.4f} (cycle {history[-1]['cycle']}, "
              f"{history[-1]['n_labeled']} labels{views})")
        print(f"last query:   {history[-1]['query']}")
        print()
        print(format_lineage(history, state["data_version"], split))
    parent = state["tracking"].get("parent_run_id")
    if parent:
        print(f"\nMLflow parent run: {parent}")
    from tidal.labeling.imports import waiting_for_labels

    waiting = waiting_for_labels(params)
    if waiting:
        _print_waiting(waiting, params)
    return 0


def _print_history(params: dict, sample_id: str) -> int:
    from tidal.labeling.imports import labels_file
    from tidal.labeling.provenance import label_history
    from tidal.workspace import workspace

    state = workspace(params).load_state()
    rows = label_history(labels_file(params), sample_id) if labels_file(params).is_file() else []
    if not rows and sample_id not in state["labeled"] and sample_id not in state["pending"]:
        print(f"error: no label history for '{sample_id}' in experiment '{params['experiment']}'", file=sys.stderr)
        return 1
    print(f"label history of {sample_id} in {params['experiment']}:")
    if sample_id in state["labeled"] and not rows:
        print(f"  {state['labeled'][sample_id]}  (from the data set: initial set or oracle)")
    for r in rows:
        extra = f", supersedes {r['supersedes']}" if r.get("supersedes") else ""
        print(f"  {r['label']}  by {r.get('annotator') or '?'} at {r['imported_at']} "
              f"(cycle {r['cycle']}, query {r['query_id']}, from {r['source']}{extra})")
    if sample_id in state["pending"]:
        print(f"  pending in query {state['pending'][sample_id]['query_id']}")
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    """A local transaction (tidal.labeling.imports.import_labels): no Prefect server to wait for."""
    params = _experiment_params(args)
    from tidal.labeling.imports import import_labels
    from tidal.tracking import data_version_recorder
    from tidal.workspace import ExperimentLock, workspace

    start = time.perf_counter()
    with ExperimentLock(workspace(params).root):
        summary = import_labels(params, args.file, args.format, force=args.force, relabel=args.relabel,
                                on_version=data_version_recorder(params))
    print(f"imported {summary['new']} new label(s), {summary['relabeled']} relabeled, "
          f"{summary['unchanged']} unchanged, {summary['skipped']} skipped (no label); "
          f"{summary['still_pending']} still pending")
    if summary["conflict_report"]:
        print(summary["conflict_report"])
    from tidal.data.version import pin_file

    pinned = f"re-pinned in {pin_file(params['data_root']).name}" if summary["dvc_pinned"] else "not DVC-pinned here"
    print(f"data version {summary['data_version']} ({pinned}) in {time.perf_counter() - start:.1f} s; "
          f"next: {next_command(params, 'run')}")
    return 0


def cmd_labelstudio(args: argparse.Namespace) -> int:
    """connect: check and save the connection; push: (re)push the pending query; pull: import the
    annotations made there (see tidal/labeling/labelstudio.py); listen: webhook and inbox to Prefect events
    (flows/listener.py)."""
    actions = {"connect": _labelstudio_connect, "push": _labelstudio_push, "pull": _labelstudio_pull,
               "listen": _labelstudio_listen}
    return actions[args.action](args)


def _labelstudio_listen(args: argparse.Namespace) -> int:
    from tidal.labeling import labelstudio

    params = load_params(_params_path(args.params), args.set)
    _offline_defaults()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from flows.listener import SPOOL_DIR, Listener

    runs_dir = Path(params["runs_dir"])
    secret_file = labelstudio.secret_path(params)
    try:
        listener = Listener(args.host, args.port, secret_file, runs_dir / SPOOL_DIR,
                            Path(args.inbox) if args.inbox else None, runs_dir=runs_dir)
    except (OSError, OverflowError) as err:  # the port taken or out of range, an address not here
        reason = getattr(err, "strerror", None) or err
        raise labelstudio.LabelStudioError(f"cannot listen on {args.host}:{args.port}: {reason}; choose another "
                                           "--port or --host") from None
    print(f"listening for Label Studio webhooks on http://{args.host}:{args.port}/webhook"
          + (f" and labels files in {args.inbox}/<experiment>/" if args.inbox else ""), flush=True)
    if labelstudio.read_webhook_secret(secret_file) is None:
        print(f"note: no webhook secret in {secret_file} yet: webhooks are refused until "
              "`tidal labelstudio connect` writes it", flush=True)
    listener.serve_forever()
    return 0


def _labelstudio_connect(args: argparse.Namespace) -> int:
    from tidal.labeling import labelstudio

    params = load_params(_params_path(args.params), args.set)
    if not args.url:
        raise labelstudio.LabelStudioError("connect needs --url, e.g. --url http://127.0.0.1:8080")
    saved = labelstudio.connect(params, args.url, args.token_env, args.document_root, args.webhook_url)
    print(f"connected to Label Studio at {saved['url']} as {saved['user']} (token from ${saved['token_env']}); "
          f"saved in {labelstudio.connection_path(params)}; the webhook's secret is in {saved['secret_file']}")
    if not saved["document_root"]:
        print("note: without --document-root the query images cannot be served; give Label Studio's "
              "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    return 0


def _labelstudio_push(args: argparse.Namespace) -> int:
    from tidal.labeling import labelstudio
    from tidal.pipeline import push_query
    from tidal.workspace import ExperimentLock, workspace

    params = _experiment_params(args)
    ws = workspace(params)
    with ExperimentLock(ws.root):
        pending = ws.load_state()["pending"] if ws.exists() else {}
        if not pending:
            print("no query has pending ids: nothing to push")
            return 0
        pushed = push_query(params, max(q["cycle"] for q in pending.values()))
    if pushed is None:
        raise labelstudio.LabelStudioError("push needs label_mode=human and a Label Studio connected "
                                           "(`tidal labelstudio connect --url URL`)")
    print(f"pushed {pushed['pushed']} task(s) ({pushed['already_there']} already there) to {pushed['url']}")
    return 0


def _labelstudio_pull(args: argparse.Namespace) -> int:
    from tidal.labeling.imports import pull_labels
    from tidal.tracking import data_version_recorder
    from tidal.workspace import ExperimentLock, workspace

    params = _experiment_params(args)
    with ExperimentLock(workspace(params).root):
        result = pull_labels(params, args.min_new, data_version_recorder(params))
    if not result["imported"]:
        print(f"{result['answered']} of {result['pending']} pending id(s) answered in Label Studio; "
              f"{result['needed']} needed to import (--min-new / labelstudio.min_new): nothing imported")
        return 0
    for summary in result["imports"]:
        print(f"imported {summary['new']} new label(s), {summary['relabeled']} relabeled, {summary['unchanged']} "
              f"unchanged, {summary['skipped']} skipped; {summary['still_pending']} still pending")
        if summary["conflict_report"]:
            print(summary["conflict_report"])
    print(f"next: {next_command(params, 'run')}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    params = load_params(_params_path(args.params), args.set)
    from tidal.experiment import prepare_data

    info = prepare_data(params)
    pinned = "matches its DVC pin" if info["pinned"] else "not pinned by DVC here"
    print(f"{info['data_dir']}: data version {info['dir_version']} ({pinned})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Learning curves of every strategy/seed found in MLflow: PNG, markdown, CSV, an HTML report."""
    from tidal.experiment import RESUMABLE_KEYS
    from tidal.report import check_one_protocol, write_report
    from tidal.tracking import MlflowTracker

    tracker = MlflowTracker()
    try:
        rows, superseded = tracker.learning_curves(args.experiment or None)
        check_one_protocol(rows, RESUMABLE_KEYS)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no experiment runs with a learning curve at {tracker.uri}; run `tidal run` first",
              file=sys.stderr)
        return 1
    if superseded:
        print(f"left out {len(superseded)} older parent run(s) of experiments started over "
              f"(the newest of each strategy and seed counts): {', '.join(superseded)}")
    files = write_report(rows, args.out, lambda r: tracker.run_url(r["experiment_id"], r["run_id"]))
    run_id = tracker.log_report(list(files.values()))
    print(files["table"].read_text())
    print(f"plot: {files['plot']}\ntable: {files['table']}\ncurves: {files['curves']}\nreport: {files['report']}\n"
          f"logged to MLflow run {run_id} (experiment 'tidal-comparisons')")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register the best (or last) cycle model of an experiment under an alias."""
    from tidal.tracking import MlflowTracker

    if args.name is not None:  # a new name in the model registry, and in every models:/ URI
        check_name("--name (the registered model)", args.name)
    try:
        uri = MlflowTracker().register_cycle_model(args.experiment, args.name or args.experiment, args.alias,
                                                   args.pick)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"registered: {uri}\nload it with mlflow.pytorch.load_model('{uri}')")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve prefect.yaml's deployments (with their schedules) from this process."""
    load_params(_params_path(args.params), args.set)  # fail fast on bad overrides
    _offline_defaults()
    from flows.serve import serve

    serve(args.prefect_yaml, args.set)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    """Start, inspect or stop the team stack (tidal/stack.py)."""
    from tidal import stack

    if args.action == "up":
        state = stack.up(args.dir, args.prefect_port, args.mlflow_port, project=args.project)
        parts = "PostgreSQL, Prefect server, MLflow server" + (", work pool, deployments, worker" if args.project
                                                                else "")
        print(f"team stack up from {state['dir']}: {parts} (logs in {state['dir']}/logs). Point clients at it:")
        for key, value in state["env"].items():
            print(f"export {key}={value}")
    elif args.action == "status":
        found = stack.status(args.dir)
        if not found["parts"]:
            print(f"no team stack in {args.dir}")
            return 1
        for name, alive in found["parts"].items():
            print(f"{name:9s} {'running' if alive else 'STOPPED'}")
        for key, value in found["env"].items():
            print(f"export {key}={value}")
        return 0 if found["running"] else 1
    else:
        if stack.down(args.dir):
            print(f"team stack in {args.dir} stopped")
        else:
            print(f"no team stack in {args.dir}: nothing to stop")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="TiDAL active learning pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", default=None, help="params file (default: ./params.yaml if present)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one params key, e.g. --set train.epochs=5 (repeatable)")

    p_run = sub.add_parser("run", help="run (or resume) the experiment flow")
    common(p_run)
    p_run.set_defaults(func=cmd_run)
    p_status = sub.add_parser("status", help="print an experiment's state")
    common(p_status)
    p_status.add_argument("--experiment", default=None, help="experiment name (default: from params)")
    p_status.add_argument("--history", default=None, metavar="ID", help="every label this sample id ever had")
    p_status.set_defaults(func=cmd_status)
    p_import = sub.add_parser("import-labels", help="validate and merge annotations of a query")
    common(p_import)
    p_import.add_argument("file", help="annotated query.csv, query.jsonl or a Label Studio JSON export")
    p_import.add_argument("--experiment", default=None, help="experiment name (default: from params)")
    p_import.add_argument("--format", choices=["csv", "jsonl", "label-studio"], default=None,
                          help="file format (default: from the extension)")
    p_import.add_argument("--force", action="store_true", help="accept ids that are not in the pending query")
    p_import.add_argument("--relabel", action="store_true",
                          help="let a new label supersede an earlier one (the old one stays in the history)")
    p_import.set_defaults(func=cmd_import_labels)
    p_ls = sub.add_parser("labelstudio", help="connect Label Studio, push the pending query, pull its labels, "
                                               "listen for its webhook")
    common(p_ls)
    p_ls.add_argument("action", choices=["connect", "push", "pull", "listen"])
    p_ls.add_argument("--experiment", default=None, help="experiment name (default: from params)")
    p_ls.add_argument("--url", default=None, help="connect: Label Studio's address, e.g. http://127.0.0.1:8080")
    p_ls.add_argument("--token-env", default="LABEL_STUDIO_TOKEN",
                      help="connect: environment variable holding the API token (default: LABEL_STUDIO_TOKEN)")
    p_ls.add_argument("--document-root", default=None,
                      help="connect: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (images are served from it)")
    p_ls.add_argument("--webhook-url", default=None,
                      help="connect: where Label Studio's webhook reaches `tidal labelstudio listen`")
    p_ls.add_argument("--host", default="127.0.0.1", help="listen: address to bind (default 127.0.0.1)")
    p_ls.add_argument("--port", type=int, default=8765, help="listen: port (default 8765)")
    p_ls.add_argument("--inbox", default=None,
                      help="listen: also watch INBOX/<experiment>/ for dropped labels files")
    p_ls.add_argument("--min-new", type=int, default=None,
                      help="pull: import only once this many pending ids are answered (default: labelstudio.min_new)")
    p_ls.set_defaults(func=cmd_labelstudio)
    p_data = sub.add_parser("data", help="write the dataset if missing and check it against data.dvc")
    common(p_data)
    p_data.set_defaults(func=cmd_data)
    p_serve = sub.add_parser("serve", help="serve the scheduled deployments of prefect.yaml without a work pool")
    common(p_serve)
    p_serve.add_argument("--prefect-yaml", default="prefect.yaml", help="deployments file (default: prefect.yaml)")
    p_serve.set_defaults(func=cmd_serve)
    p_compare = sub.add_parser("compare", help="compare strategies' learning curves from MLflow")
    p_compare.add_argument("--experiment", action="append", default=[],
                           help="MLflow experiment name or shell pattern, e.g. 'grid-*', or a study's name "
                                "(repeatable; default: all)")
    p_compare.add_argument("--out", default="reports", help="output folder (default: reports/)")
    p_compare.set_defaults(func=cmd_compare)
    p_register = sub.add_parser("register", help="register a cycle's model under an alias")
    p_register.add_argument("--experiment", required=True, help="the experiment (params 'experiment'; found in its study too)")
    p_register.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    p_register.add_argument("--pick", choices=["best", "last"], default="best",
                            help="the cycle with the best accuracy, or the last one")
    p_register.add_argument("--name", default=None, help="registered model name (default: the experiment)")
    p_register.set_defaults(func=cmd_register)
    p_stack = sub.add_parser("stack", help="start, inspect or stop PostgreSQL + Prefect + MLflow servers")
    p_stack.add_argument("action", choices=["up", "status", "down"])
    p_stack.add_argument("--dir", default=".stack", help="the stack's data, logs and state (default: .stack)")
    p_stack.add_argument("--prefect-port", type=int, default=4200)
    p_stack.add_argument("--mlflow-port", type=int, default=5000)
    p_stack.add_argument("--project", default=None,
                         help="a folder with prefect.yaml: also its work pool, deployments and a worker")
    p_stack.set_defaults(func=cmd_stack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    from tidal.data.errors import DataError
    from tidal.experiment import ExperimentMismatch
    from tidal.train import TrainingDiverged
    from tidal.launch import DistributedTrainingFailed
    from tidal.stack import StackError
    from tidal.workspace import ExperimentLocked, WorkspaceWriteError

    errors: tuple[type[Exception], ...] = (ConfigError, DataError, ExperimentMismatch, TrainingDiverged,
                                           DistributedTrainingFailed, ExperimentLocked, WorkspaceWriteError,
                                           StackError, FileNotFoundError)
    from tidal.labeling.annotations import LabelImportError
    from tidal.labeling.labelstudio import LabelStudioError
    from tidal.models.timm_backbone import WeightsError

    errors += (LabelImportError, LabelStudioError, WeightsError)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is a BrokenPipeError this handler sees
        return code
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `tidal status | head`: the reader has gone; end quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
