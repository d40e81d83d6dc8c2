"""``hf-geocomp serve``: its flags (from :class:`~hf_geocomp.serve.config.ServeConfig`) and the command.

FastAPI and uvicorn are imported only when the server starts (the ``serve`` extra), so ``import hf_geocomp``
and ``hf-geocomp --help`` stay light.
"""

from __future__ import annotations

import contextlib
import dataclasses

from ..errors import GeoCompError
from ..options import add_options, summary
from .config import ServeConfig


def add_parser(sub, lazy) -> None:
    text = summary(ServeConfig)
    p = sub.add_parser("serve", help=text, description=text)
    add_options(p, ServeConfig, overwrite=False)
    p.set_defaults(options=None, handler=lazy(".serve.cli:serve_command"))


def serve_command(ns) -> None:
    serve(ServeConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeConfig)}))


def check_port(host: str, port: int) -> None:
    """Refuse, before any model loads, an address this machine cannot listen on."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise GeoCompError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another with --port or --host.") \
            from None


def load_models(config: ServeConfig) -> dict:
    """``{"base": ..., "compressed": ...}`` as :class:`~hf_geocomp.serve.engine.ServedModel`."""
    import torch

    from ..data import load_config
    from .engine import ServedModel

    for source in (config.base, config.compressed):  # both configs read before any weights: a bad second name
        load_config(source)                          # fails now, not after the first model has loaded
    dtype = getattr(torch, config.dtype)
    return {"base": ServedModel("base", config.base, dtype), "compressed": ServedModel("compressed", config.compressed, dtype)}


def build(config: ServeConfig):
    """The app for ``config`` with its models loaded (what :func:`serve` runs; tests and benchmarks use it too)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise GeoCompError("hf-geocomp serve needs FastAPI and uvicorn: pip install 'hf-geocomp[serve]'.") from None
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    from .app import create_app

    return create_app(load_models(config), config)


@contextlib.contextmanager
def in_thread(config: ServeConfig, port: int = 0):
    """The app of ``config`` under uvicorn in a thread of this process, on ``port`` of ``config.host`` (0: a free
    one), until the block ends: yields ``(base URL, app)`` (tests, and the page's screenshot)."""
    import threading
    import time

    import uvicorn

    app = build(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise GeoCompError(f"the server did not start on {config.host}:{port}.")
    host, bound = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{bound}", app
    finally:
        server.should_exit = True
        thread.join(10)


def serve(config: ServeConfig) -> None:
    """Load both models and answer requests until interrupted."""
    import uvicorn

    check_port(config.host, config.port)
    app = build(config)
    print(f"serving {', '.join(app.state.server.models)} on http://{config.host}:{config.port}/ (Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
