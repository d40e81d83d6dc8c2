"""Hub-compatible servers on 127.0.0.1 for tests: olah for reading, a small write side of our own.

Read side: olah (PyPI) serves the git repositories under ``MIRRORS/models/ORG/NAME`` (branch
``main``) in offline mode, so huggingface_hub's real client resolves and downloads over HTTP. One
documented correction: offline olah answers a missing file (or folder listing) of a known repository with 401
"Repository not found" instead of 404, and transformers probes optional files (e.g.
``adapter_config.json``), so such answers become 404 with ``X-Error-Code: EntryNotFound``, what
the Hub sends.

Write side (no installable server offers it): a contract test of the endpoints
``HfApi.create_repo`` / ``upload_folder`` call — ``POST /api/repos/create``,
``POST /api/validate-yaml``, ``POST /api/models/{org}/{name}/preupload/{rev}`` (every file
"regular"), ``POST /api/models/{org}/{name}/commit/{rev}`` (NDJSON: a header, then base64 files)
— each commit becoming a git commit on ``main`` of the repository the read side serves.

Both sides are one app on one port, like the Hub. Run: ``python tests/hub_server.py MIRRORS PORT``.
"""

import base64
import json
import subprocess
import sys
import threading
from pathlib import Path

GIT = ["git", "-c", "user.name=hub-test", "-c", "user.email=hub-test@localhost", "-c", "init.defaultBranch=main"]


def repo_dir(mirrors: Path, repo_id: str) -> Path:
    return mirrors / "models" / repo_id


def write_routes(mirrors: Path, read_url: str):
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse

    app = APIRouter()
    lock = threading.Lock()

    @app.post("/api/repos/create")
    async def create(request: Request):
        body = await request.json()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if "/" not in repo_id:
            return JSONResponse({"error": "a namespace is required"}, status_code=400)
        path = repo_dir(mirrors, repo_id)
        with lock:
            if not (path / ".git").exists():
                path.mkdir(parents=True, exist_ok=True)
                subprocess.run([*GIT, "init", "-q", "-b", "main", str(path)], check=True)
                (path / ".gitattributes").write_text("*.safetensors binary\n")
                subprocess.run([*GIT, "-C", str(path), "add", "-A"], check=True)
                subprocess.run([*GIT, "-C", str(path), "commit", "-q", "-m", "initial commit"], check=True)
            elif not body.get("exist_ok", True):
                return JSONResponse({"error": "You already created this model repo"}, status_code=409)
        return {"url": f"{read_url}/{repo_id}", "name": repo_id}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        return {"errors": [], "warnings": []}

    @app.post("/api/models/{org}/{name}/preupload/{revision}")
    async def preupload(org: str, name: str, revision: str, request: Request):
        files = (await request.json())["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    @app.post("/api/models/{org}/{name}/commit/{revision}")
    async def commit(org: str, name: str, revision: str, request: Request):
        path = repo_dir(mirrors, f"{org}/{name}")
        if revision != "main" or not (path / ".git").exists():
            return JSONResponse({"error": f"no repository {org}/{name} at {revision}"}, status_code=404)
        lines = [json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()]
        summary = next(x["value"]["summary"] for x in lines if x["key"] == "header")
        with lock:
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    target = path / value["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif item["key"] == "deletedFile":
                    (path / value["path"]).unlink(missing_ok=True)
                elif item["key"] != "header":
                    return JSONResponse({"error": f"unsupported commit operation {item['key']}"}, status_code=400)
            subprocess.run([*GIT, "-C", str(path), "add", "-A"], check=True)
            subprocess.run([*GIT, "-C", str(path), "commit", "-q", "--allow-empty", "-m", summary], check=True)
            sha = subprocess.run([*GIT, "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        return {"commitUrl": f"{read_url}/{org}/{name}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    return app


def read_app(mirrors: Path, port: int, work: Path):
    from olah.configs import OlahConfig
    from olah.server import AppSettings, app
    from olah.utils.logging import build_logger
    from starlette.responses import Response

    cfg = work / "olah.toml"
    cfg.write_text(f'[basic]\nhost = "127.0.0.1"\nport = {port}\nmirrors-path = ["{mirrors}"]\n'
                   f'repos-path = "{work / "olah-repos"}"\n[accessibility]\noffline = true\n')
    app.state.logger = build_logger("olah", "olah.log", logger_dir=str(work / "logs"))
    app.state.app_settings = AppSettings(config=OlahConfig(str(cfg)))

    @app.middleware("http")
    async def missing_file_is_404(request, call_next):  # the one correction (module docstring)
        response = await call_next(request)
        parts = request.url.path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:  # /api/models/ORG/NAME/tree/REV/PATH
            parts = parts[2:]
        if response.status_code == 401 and len(parts) >= 5 and parts[2] in ("resolve", "tree") and \
                repo_dir(mirrors, f"{parts[0]}/{parts[1]}").is_dir():
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound",
                                                      "X-Error-Message": "Entry not found"})
        return response

    return app


def main() -> None:
    import uvicorn

    mirrors, port = Path(sys.argv[1]), int(sys.argv[2])
    mirrors.mkdir(parents=True, exist_ok=True)
    work = mirrors.parent / "server-work"
    work.mkdir(exist_ok=True)
    app = read_app(mirrors, port, work)
    app.include_router(write_routes(mirrors, f"http://127.0.0.1:{port}"))  # POST routes: olah's are GET/HEAD
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
