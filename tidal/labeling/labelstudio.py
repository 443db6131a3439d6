"""Label Studio as the annotators' tool: push each query as tasks, pull the annotations back.

Plain HTTP (urllib) against Label Studio's REST API, no orchestration imports. The connection
is the `labelstudio.*` params keys, or, when `labelstudio.url` is null, the file
`<runs_dir>/labelstudio.json` that `tidal labelstudio connect` writes. The experiment's project
id lives in its workspace (`runs/<experiment>/labelstudio.json`).

- `push_query`: the cycle's `query_labelstudio.json` tasks go to the experiment's project
  (created once, found by the id recorded in the workspace; a random key recorded before the
  project is created, and written in its description, finds it again after a crash and proves on
  every later call that tidal created it: a project any other way is refused), each
  with the model's guess as a pre-annotation and its score and rank in the task data. Images are
  served by Label Studio from a local-files storage: Label Studio runs on this machine with
  `LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true` and `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`
  a folder above the workspace and the pool's images (`labelstudio.document_root`), so no image
  is copied. A task already in the project (same query, same sample) is never pushed again, so
  pushing after a crash is idempotent.
- `pull_labels`: the project's export (tasks with their annotations) is saved in the cycle's
  folder and imported by `tidal.labeling.imports.import_labels`, the same validation and
  provenance path as `tidal import-labels FILE` (cancelled/skipped annotations stay pending,
  disagreeing annotators follow `label_conflicts`, the annotator's Label Studio e-mail is the
  provenance).

The token goes only to Label Studio's own origin: a redirect to another scheme, host or port is
refused before anything is sent there. The webhook carries a shared secret (`webhook_secret`,
written by `connect` with mode 0600) as the custom header `SECRET_HEADER`, which
`tidal labelstudio listen` checks.

Every failure is a `LabelStudioError` naming what to do; nothing is written before the server
has answered, so a rerun after any failure resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tidal.workspace import atomic_write_text, read_json, write_json

CONNECTION_FILE = "labelstudio.json"  # in runs_dir (the connection) and in a workspace (the project)
EXPORT_FILE = "labelstudio_export.json"  # in the cycle's folder: what pull_labels imported
SECRET_FILE = "labelstudio_webhook.secret"  # in runs_dir: the webhook's shared secret, mode 0600
SECRET_HEADER = "X-Tidal-Webhook-Secret"  # the webhook's custom header carrying it
PROJECT_KEY_TAG = "tidal-project-key:"  # in a project's description, before the key tidal recorded
TIMEOUT_S = 30.0


class LabelStudioError(RuntimeError):
    """Label Studio unreachable, a refused token, a deleted project, a task that does not belong."""


def connection_path(params: dict[str, Any]) -> Path:
    return Path(params["runs_dir"]) / CONNECTION_FILE


def secret_path(params: dict[str, Any]) -> Path:
    return Path(params["runs_dir"]) / SECRET_FILE


def read_webhook_secret(path: Path) -> str | None:
    """The webhook secret in `path`; None when there is none (yet)."""
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    return secret or None


def webhook_secret(params: dict[str, Any]) -> str:
    """The shared secret of the webhook, created (32 random bytes, hex, mode 0600) the first time;
    kept afterwards, so the webhooks already registered stay valid."""
    path = secret_path(params)
    secret = read_webhook_secret(path)
    if secret is None:
        secret = secrets.token_hex(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, secret + "\n", mode=0o600)  # 0600 from its first byte
    os.chmod(path, 0o600)  # a copied or hand-made file may be readable by others
    return secret


def settings(params: dict[str, Any]) -> dict[str, Any] | None:
    """url, token_env, document_root of the Label Studio to use; None when there is none."""
    keys = params["labelstudio"]
    if keys["url"]:
        return {"url": keys["url"], "token_env": keys["token_env"], "document_root": keys["document_root"],
                "webhook_url": keys["webhook_url"]}
    saved = connection_path(params)
    return read_json(saved) if saved.is_file() else None


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port: what a browser would call the URL's origin."""
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the origin asked: the Authorization header would otherwise go
    to whichever server the first one names."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if origin(newurl) != origin(req.full_url):
            raise LabelStudioError(f"Label Studio at {req.full_url} redirected to another origin ({newurl}); the "
                                   "API token is not sent there: point labelstudio.url (or `tidal labelstudio "
                                   "connect --url`) at the server that answers itself")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


class Client:
    """The few Label Studio API calls the loop needs; errors say what to fix."""

    def __init__(self, url: str, token_env: str, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.token_env = token_env
        token = os.environ.get(token_env, "")
        if not token:
            raise LabelStudioError(f"environment variable {token_env} is empty: set it to your Label Studio API "
                                   "token (Account & Settings > Access Token in Label Studio)")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            if err.code in (401, 403):
                raise LabelStudioError(f"Label Studio at {self.url} refused the token in {self.token_env} "
                                       f"({err.code}): set it to a valid API token") from None
            raise LabelStudioError(f"Label Studio at {self.url}: {method} {path} answered {err.code}: "
                                   f"{detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LabelStudioError(f"Label Studio at {self.url} is not reachable ({reason}): start it, or "
                                   "point labelstudio.url (or `tidal labelstudio connect --url`) at it; "
                                   "then run the same command again") from None
        return json.loads(raw) if raw else None

    def whoami(self) -> dict[str, Any]:
        return self.call("GET", "/api/current-user/whoami")

    def projects(self) -> list[dict[str, Any]]:
        found = self.call("GET", "/api/projects", query={"page_size": 10000})
        return found["results"] if isinstance(found, dict) else found

    def export(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (Label Studio's JSON export)."""
        return self.call("GET", f"/api/projects/{project_id}/export",
                         query={"exportType": "JSON", "download_all_tasks": "true"})

    def users(self) -> dict[int, str]:
        found = self.call("GET", "/api/users")
        found = found["results"] if isinstance(found, dict) else found
        return {u["id"]: u.get("email") or u.get("username") or str(u["id"]) for u in found}


def connect(params: dict[str, Any], url: str, token_env: str, document_root: str | None,
            webhook_url: str | None = None) -> dict[str, Any]:
    """Check the server and the token, then remember the connection in `<runs_dir>/labelstudio.json`."""
    who = Client(url, token_env).whoami()
    if document_root is not None and not Path(document_root).is_dir():
        raise LabelStudioError(f"--document-root {document_root} is not a folder: give Label Studio's "
                               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    saved = {"url": url.rstrip("/"), "token_env": token_env,
             "document_root": str(Path(document_root).resolve()) if document_root else None,
             "webhook_url": webhook_url}
    connection_path(params).parent.mkdir(parents=True, exist_ok=True)
    write_json(connection_path(params), saved)
    webhook_secret(params)  # the listener checks it; push_query registers it on each project's webhook
    return {**saved, "user": who.get("email") or who.get("username"), "secret_file": str(secret_path(params))}


def project_title(experiment: str) -> str:
    """Label Studio wants 3 to 50 characters; a longer name is cut and keeps a hash of the whole, so
    two long names still read apart (the title is for people: tidal finds projects by id and key)."""
    title = f"tidal {experiment}"
    if len(title) <= 50:
        return title
    return f"{title[:41]}~{hashlib.sha256(experiment.encode()).hexdigest()[:8]}"


def project_key_of(project: dict[str, Any]) -> str | None:
    """The key tidal wrote in the description of a project it created; None for any other."""
    parts = (project.get("description") or "").split(PROJECT_KEY_TAG, 1)
    after = parts[1].split() if len(parts) == 2 else []
    return after[0] if after else None


def _checked_project(client: Client, params: dict[str, Any], recorded: Path) -> int:
    """The project id recorded in the workspace, once Label Studio shows it is still there and
    still the one tidal created (its description has the recorded key)."""
    record = read_json(recorded)
    project_id = record["project_id"]
    try:
        project = client.call("GET", f"/api/projects/{project_id}")
    except LabelStudioError as err:
        if "answered 404" not in str(err):
            raise
        raise LabelStudioError(
            f"Label Studio project {project_id} of experiment {params['experiment']!r} is gone (deleted "
            f"in Label Studio?): delete {recorded} to push the pending query to a new project, then run "
            "the same command again") from None
    key = record.get("project_key")
    if key is None or not isinstance(project, dict) or project_key_of(project) != key:
        raise LabelStudioError(
            f"Label Studio project {project_id} at {client.url} is not the project tidal created for experiment "
            f"{params['experiment']!r} (its description lacks the key recorded in {recorded}; another server, "
            "or a project made by someone else?): tidal will not push to or pull from it. Connect the Label "
            f"Studio that has the experiment's project, or delete {recorded} to create a new project")
    return project_id


def _project(client: Client, params: dict[str, Any], workspace_root: Path, label_config: str) -> int:
    """The experiment's project: the one recorded in the workspace, else the one whose description
    has the key recorded before it was created (a crash after creating it), else a new one. A
    project tidal did not create is never adopted, whatever its title."""
    recorded = workspace_root / CONNECTION_FILE
    record = read_json(recorded) if recorded.is_file() else {}
    if record.get("project_id") is not None:
        return _checked_project(client, params, recorded)
    key = record.get("project_key")
    if key is None:
        key = secrets.token_hex(16)
        write_json(recorded, {"url": client.url, "project_id": None, "project_key": key})
    same = [p for p in client.projects() if project_key_of(p) == key]
    project = same[0] if same else client.call("POST", "/api/projects", {
        "title": project_title(params["experiment"]), "label_config": label_config,
        "description": f"Queries of the tidal experiment {params['experiment']!r}. {PROJECT_KEY_TAG} {key}"})
    write_json(recorded, {"url": client.url, "project_id": project["id"], "project_key": key})
    return project["id"]


def _storage_for(client: Client, project_id: int, folder: Path) -> None:
    """A local-files storage of the project covering `folder` (never synced: tasks come from
    push_query, the storage only lets Label Studio serve the files)."""
    storages = client.call("GET", "/api/storages/localfiles", query={"project": project_id})
    if any(folder.is_relative_to(s["path"]) for s in storages):
        return
    client.call("POST", "/api/storages/localfiles", {
        "project": project_id, "path": str(folder), "title": f"tidal images {folder.name}"[:50],
        "use_blob_urls": False, "regex_filter": ""})


WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]


def _webhook_for(client: Client, project_id: int, url: str, secret: str) -> None:
    """The project's webhook to `tidal labelstudio listen`, carrying the shared secret (registered
    once; a webhook registered before the secret, or with another one, gets the current one)."""
    hooks = client.call("GET", "/api/webhooks", query={"project": project_id})
    ours = [h for h in hooks if h.get("url") == url and h.get("project") == project_id]
    headers = {SECRET_HEADER: secret}
    if not ours:
        client.call("POST", "/api/webhooks", {"project": project_id, "url": url, "send_payload": True,
                                              "send_for_all_actions": False, "actions": WEBHOOK_ACTIONS,
                                              "headers": headers})
    elif (ours[0].get("headers") or {}).get(SECRET_HEADER) != secret:
        client.call("PATCH", f"/api/webhooks/{ours[0]['id']}", {"headers": {**(ours[0].get("headers") or {}),
                                                                             **headers}})


def image_url(path: str, document_root: Path) -> str:
    """The URL Label Studio serves a file under its LOCAL_FILES_DOCUMENT_ROOT at."""
    relative = Path(path).resolve().relative_to(document_root)
    return "/data/local-files/?" + urllib.parse.urlencode({"d": relative.as_posix()})


def push_query(params: dict[str, Any], workspace_root: Path, cycle_dir: Path) -> dict[str, Any]:
    """Push the cycle's query to the experiment's Label Studio project; returns counts."""
    from tidal.labeling.queries import EXPORT_FILES, LABELSTUDIO_CONFIG

    conn = settings(params)
    if conn is None:
        raise LabelStudioError("no Label Studio connected: run `tidal labelstudio connect --url URL` or set "
                               "labelstudio.url")
    if not conn.get("document_root"):
        raise LabelStudioError("labelstudio.document_root is not set: give the folder Label Studio serves "
                               "local files from (its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), above the "
                               "workspace and the pool's images")
    root = Path(conn["document_root"]).resolve()
    tasks = json.loads((cycle_dir / EXPORT_FILES["label-studio"]).read_text())
    files = [Path(t["data"]["image"]).resolve() for t in tasks]
    outside = [str(f) for f in files if not f.is_relative_to(root)]
    if outside:
        raise LabelStudioError(f"{len(outside)} query image(s) lie outside labelstudio.document_root {root} "
                               f"(e.g. {outside[0]}): start Label Studio with a LABEL_STUDIO_LOCAL_FILES_"
                               "DOCUMENT_ROOT above them and set labelstudio.document_root to it")
    client = Client(conn["url"], conn["token_env"])
    project_id = _project(client, params, workspace_root, (cycle_dir / LABELSTUDIO_CONFIG).read_text())
    if files:  # the workspace for array pools' PNGs (one storage for every cycle), else the files' folder
        common = Path(os.path.commonpath([f.parent for f in files]))
        ws = workspace_root.resolve()
        _storage_for(client, project_id, ws if common.is_relative_to(ws) else common)
    if conn.get("webhook_url"):
        _webhook_for(client, project_id, conn["webhook_url"], webhook_secret(params))
    there = {(t["data"].get("query_id"), str(t["data"].get("sample_id"))) for t in client.export(project_id)}
    new = []
    for task in tasks:
        data = task["data"]
        if (data["query_id"], data["sample_id"]) in there:
            continue
        new.append({**task, "data": {**data, "image": image_url(data["image"], root), "path": data["image"]}})
    if new:
        client.call("POST", f"/api/projects/{project_id}/import", new)
    return {"project_id": project_id, "pushed": len(new), "already_there": len(tasks) - len(new),
            "url": f"{client.url}/projects/{project_id}"}


def pull_export(params: dict[str, Any], workspace_root: Path, out_paths: dict[str, Path]) -> dict[str, Any]:
    """Save the project's annotated tasks of each query in `out_paths` ({query_id: file}), with
    annotators by e-mail: the files `tidal.labeling.imports.import_labels` then reads as Label
    Studio JSON. Tasks of other queries are left alone; an annotated task that tidal did not push
    (no sample id or query id in its data) is an error. Returns {query_id: annotated tasks
    written}."""
    conn = settings(params)
    recorded = workspace_root / CONNECTION_FILE
    if conn is None or not recorded.is_file() or read_json(recorded).get("project_id") is None:
        raise LabelStudioError(f"experiment {params['experiment']!r} has no Label Studio project yet: run it in "
                               "human mode with Label Studio connected first (`tidal run --set label_mode=human`)")
    client = Client(conn["url"], conn["token_env"])
    project_id = _checked_project(client, params, recorded)
    tasks = client.export(project_id)
    users = client.users()
    by_query: dict[str, list[dict[str, Any]]] = {q: [] for q in out_paths}
    for task in tasks:
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
        if not annotations:
            continue
        data = task.get("data") or {}
        if "sample_id" not in data or "query_id" not in data:
            raise LabelStudioError(f"task {task.get('id')} of Label Studio project {project_id} is annotated but "
                                   "was not pushed by tidal (its data has no sample_id/query_id): delete it "
                                   "from the project, then pull again")
        if data["query_id"] not in by_query:
            continue
        for a in annotations:
            who = a.get("completed_by")
            if isinstance(who, int):
                a["completed_by"] = {"id": who, "email": users.get(who, str(who))}
        by_query[data["query_id"]].append({"id": task.get("id"), "data": data, "annotations": annotations})
    for query, out_path in out_paths.items():
        atomic_write_text(out_path, json.dumps(by_query[query], indent=1) + "\n")
    return {q: len(found) for q, found in by_query.items()}
