"""Issue #31, item 3: the Label Studio token never leaves Label Studio's origin, and tidal works
only with the project it created for an experiment (found by its recorded id and key, never by a
title another experiment or another user may share). A small stand-in for Label Studio's API runs
on 127.0.0.1; tests/integration/test_labelstudio.py checks the same against a real one."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tidal.labeling import labelstudio
from tidal.labeling.labelstudio import Client, LabelStudioError

TOKEN = "t0ken" * 8


class FakeStudio:
    """Projects in a dict; every request's path and Authorization header recorded; `redirects`
    maps a path to the URL it answers 302 with."""

    def __init__(self) -> None:
        self.projects: dict[int, dict] = {}
        self.seen: list[tuple[str, str | None]] = []
        self.redirects: dict[str, str] = {}
        studio = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: object = None, location: str | None = None) -> None:
                raw = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802
                studio.seen.append((self.path, self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                if path in studio.redirects:
                    return self._answer(302, location=studio.redirects[path])
                if path == "/api/projects":
                    return self._answer(200, {"results": list(studio.projects.values())})
                if path.startswith("/api/projects/"):
                    found = studio.projects.get(int(path.rsplit("/", 1)[1]))
                    return self._answer(200, found) if found else self._answer(404, {"detail": "Not found."})
                return self._answer(200, {"path": path})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                studio.seen.append((self.path, self.headers.get("Authorization")))
                project = {"id": len(studio.projects) + 1, "description": "", **body}
                studio.projects[project["id"]] = project
                self._answer(201, project)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def studios():
    made = [FakeStudio(), FakeStudio()]
    yield made
    for studio in made:
        studio.close()


@pytest.fixture
def client(studios, monkeypatch) -> Client:
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", TOKEN)
    return Client(studios[0].url, "LABEL_STUDIO_TOKEN")


def test_the_token_is_not_sent_to_another_origin(studios, client):
    ours, theirs = studios
    ours.redirects["/api/current-user/whoami"] = theirs.url + "/steal"
    with pytest.raises(LabelStudioError, match="redirected to another origin"):
        client.whoami()
    assert theirs.seen == []  # no request at all reached the other server, so no token either

    # Within Label Studio's own origin a redirect is followed, with the token.
    ours.redirects["/api/old"] = ours.url + "/api/new"
    assert client.call("GET", "/api/old") == {"path": "/api/new"}
    assert ours.seen[-1] == ("/api/new", f"Token {TOKEN}")


def test_origin_compares_scheme_host_and_port():
    assert labelstudio.origin("http://LS.example/api") == labelstudio.origin("http://ls.example:80/x")
    assert labelstudio.origin("http://ls.example/") != labelstudio.origin("https://ls.example/")
    assert labelstudio.origin("http://127.0.0.1:18082/") != labelstudio.origin("http://127.0.0.1:18081/")


def project_of(client: Client, tmp_path, experiment: str) -> int:
    ws = tmp_path / experiment
    ws.mkdir(exist_ok=True)
    return labelstudio._project(client, {"experiment": experiment}, ws, "<View/>")


def test_long_names_sharing_44_characters_get_projects_of_their_own(studios, client, tmp_path):
    common = "resnet18-cifar10-tidal-entropy-budget-1000-s"  # 44 characters
    first, second = project_of(client, tmp_path, common + "eed-0"), project_of(client, tmp_path, common + "eed-1")
    assert first != second
    titles = [p["title"] for p in studios[0].projects.values()]
    assert len(set(titles)) == 2 and all(3 <= len(t) <= 50 for t in titles)
    assert project_of(client, tmp_path, common + "eed-0") == first  # found again by its recorded id


def test_a_project_tidal_did_not_create_is_never_adopted(studios, client, tmp_path):
    # Someone made a project with the title tidal would give: tidal makes its own.
    squatter = {"id": 1, "title": labelstudio.project_title("exp"), "description": "mine"}
    studios[0].projects[1] = squatter
    assert project_of(client, tmp_path, "exp") == 2

    # The recorded id now names a project that is not tidal's (another server, a re-created
    # database): refused, nothing pushed to it.
    record = json.loads((tmp_path / "exp/labelstudio.json").read_text())
    (tmp_path / "exp/labelstudio.json").write_text(json.dumps({**record, "project_id": 1}))
    with pytest.raises(LabelStudioError, match="not the project tidal created"):
        project_of(client, tmp_path, "exp")


def test_a_recorded_project_without_its_key_is_refused(studios, client, tmp_path):
    first = project_of(client, tmp_path, "exp")
    record = json.loads((tmp_path / "exp/labelstudio.json").read_text())
    (tmp_path / "exp/labelstudio.json").write_text(json.dumps({"url": record["url"], "project_id": first}))
    with pytest.raises(LabelStudioError, match="not the project tidal created"):
        project_of(client, tmp_path, "exp")


def test_a_crash_after_creating_the_project_finds_it_again(studios, client, tmp_path):
    first = project_of(client, tmp_path, "exp")
    record = json.loads((tmp_path / "exp/labelstudio.json").read_text())
    # Killed between Label Studio's answer and the recording of the id: only the key was saved.
    (tmp_path / "exp/labelstudio.json").write_text(json.dumps({**record, "project_id": None}))
    assert project_of(client, tmp_path, "exp") == first
    assert len(studios[0].projects) == 1
