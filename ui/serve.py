"""Where and how the UI may listen: on 127.0.0.1 unless a password protects it (`lite-srpo ui`, `python ui/app.py`).

Listening on another address, or a public share link, is refused without auth: the UI starts
processes and reads files on this machine. Auth comes from `auth=` ("user:password" or a tuple) or,
to keep the password out of the process list, the LITE_SRPO_UI_AUTH environment variable. The address is
--host/--port, else GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (as in Docker images and Spaces), else 127.0.0.1:7860.
This module imports no Gradio, so the CLI can offer `lite-srpo ui`'s arguments without loading it; `app.launch`
serves the page.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lite_srpo.errors import ConfigError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "LITE_SRPO_UI_AUTH"
HOST_ENV, PORT_ENV = "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"  # Gradio's own variables (Docker, Spaces)
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: its recipes/ are the default


def parse_auth(auth: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """'user:password' or (user, password) → tuple; both parts must be non-empty."""
    if auth is None or auth == "":
        return None
    if isinstance(auth, str):
        if ":" not in auth:
            raise ConfigError("ui auth: use user:password")
        user, password = auth.split(":", 1)
    else:
        if len(auth) != 2:
            raise ConfigError("ui auth: use user:password")
        user, password = auth
    if not user or not password:
        raise ConfigError("ui auth: both a username and a password are needed")
    return user, password


def resolve_address(host: str | None = None, port: int | None = None,
                    env: dict[str, str] | None = None) -> tuple[str, int]:
    """Host and port: an explicit value, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1:7860.

    The address is resolved here, not left to Gradio, so `check_exposure` judges the one actually used."""
    env = os.environ if env is None else env
    host = host or env.get(HOST_ENV, "").strip() or DEFAULT_HOST
    if port is None:
        raw = env.get(PORT_ENV, "").strip()
        if not raw:
            return host, DEFAULT_PORT
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise ConfigError(f"ui: {PORT_ENV}={raw!r} is not a port number (1-65535)")
        port = int(raw)
    return host, port


def check_exposure(host: str, share: bool, auth: tuple[str, str] | None) -> None:
    if auth is not None:
        return
    if share:
        raise ConfigError("ui: refusing to create a public share link without a username/password "
                          f"(pass --auth user:password or set {AUTH_ENV})")
    if host not in LOCAL_HOSTS:
        raise ConfigError(f"ui: refusing to listen on {host} without a username/password — anyone who can reach "
                          f"it could start processes here (pass --auth user:password or set {AUTH_ENV}, "
                          "or keep the default 127.0.0.1)")


def resolve_dir(path: str | Path, bundled: str) -> Path:
    """A relative recipes dir that does not exist here falls back to the repository's own."""
    p = Path(path)
    return p if p.is_dir() or p.is_absolute() else (REPO_ROOT / bundled if (REPO_ROOT / bundled).is_dir() else p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None,
                   help=f"address to listen on (default ${HOST_ENV} or {DEFAULT_HOST}; others need --auth)")
    p.add_argument("--port", type=int, default=None, help=f"default ${PORT_ENV} or {DEFAULT_PORT}")
    p.add_argument("--share", action="store_true", help="public Gradio link (needs --auth)")
    p.add_argument("--auth", default=None, help=f"user:password (or set {AUTH_ENV})")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--recipes-dir", default="recipes")
