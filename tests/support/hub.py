"""A stand-in for the Hugging Face Hub's model API, on a loopback port.

Tests have no internet. The operator asks `GET /api/models/{id}/revision/{rev}` before it
creates pods; this server answers as the hub does (status code plus `X-Error-Code`): 200 for a
known public model and revision, 401 `RepoNotFound` for anything else asked without
credentials, 404 `RevisionNotFound` for an unknown revision of a known model.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PUBLIC_MODELS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": {"main", "fp16"}}


class StandInHub:
    def __init__(self) -> None:
        self.models = PUBLIC_MODELS
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests.append(self.path)
                status, error_code, body = hub.answer(urllib.parse.unquote(self.path))
                data = json.dumps(body).encode()
                self.send_response(status)
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str) -> tuple[int, str, dict]:
        prefix = "/api/models/"
        if not path.startswith(prefix) or "/revision/" not in path:
            return 404, "", {"error": "not an API path"}
        repo, revision = path[len(prefix):].rsplit("/revision/", 1)
        if repo not in self.models:
            return 401, "RepoNotFound", {"error": "Repository not found"}
        if revision not in self.models[repo]:
            return 404, "RevisionNotFound", {"error": f"Invalid rev id: {revision}"}
        return 200, "", {"id": repo, "sha": "0" * 40}

    def start(self) -> StandInHub:
        self.thread.start()  # a daemon thread: it ends with the test session
        return self


_shared: StandInHub | None = None


def shared_hub() -> StandInHub:
    """One stand-in hub for the whole test session (operators started by tests ask it)."""
    global _shared
    if _shared is None:
        _shared = StandInHub().start()
    return _shared
