"""The UI's auth guard is enforced, not only decided: the real Gradio app served by `ui.app.launch`
on 127.0.0.1 with a password refuses unauthenticated requests to its config and API and lets a login in;
`LITE_SRPO_UI_AUTH` does the same; a public address without auth fails before the app is built."""
from __future__ import annotations

import socket

import httpx
import pytest

from lite_srpo.errors import ConfigError
from ui import app as ui_app
from ui import serve

ROOT_RECIPES = serve.REPO_ROOT / "recipes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Launch the real app (non-blocking) and close it afterwards."""
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):  # the address is the test's, not the shell's
        monkeypatch.delenv(name, raising=False)
    apps = []

    def serve(**kwargs):
        port = free_port()
        demo = ui_app.launch(port=port, block=False, runs_dir=tmp_path / "runs", recipes_dir=ROOT_RECIPES,
                                **kwargs)
        apps.append(demo)
        return f"http://127.0.0.1:{port}"

    yield serve
    for demo in apps:
        demo.close()


def assert_refused_without_login(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        for path in ("/config", "/gradio_api/info", "/gradio_api/openapi.json"):
            r = client.get(path)
            assert r.status_code == 401, (path, r.status_code, r.text[:200])
            assert "Not authenticated" in r.text
        r = client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert r.status_code == 401, r.text[:200]


def assert_login(url: str, user: str, password: str) -> None:
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        wrong = client.post("/login", data={"username": user, "password": password + "x"})
        assert wrong.status_code in (400, 401) and not client.cookies
        assert client.get("/config").status_code == 401
        ok = client.post("/login", data={"username": user, "password": password})
        assert ok.status_code == 200, ok.text[:200]
        config = client.get("/config")  # the session cookie from the login
        assert config.status_code == 200
        assert any(c.get("props", {}).get("elem_id") == "run-select" for c in config.json()["components"])


def test_password_is_enforced_on_the_served_app(served, monkeypatch):
    monkeypatch.delenv(serve.AUTH_ENV, raising=False)
    url = served(auth="alice:s3cret")
    assert_refused_without_login(url)
    assert_login(url, "alice", "s3cret")


def test_without_auth_on_localhost_the_app_is_open(served, monkeypatch):
    """The control for the tests above: the same requests succeed when no password is set."""
    monkeypatch.delenv(serve.AUTH_ENV, raising=False)
    url = served()
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        assert client.get("/config").status_code == 200
        assert client.get("/gradio_api/info").status_code == 200


def test_auth_from_the_environment_allows_a_public_address_and_is_enforced(served, monkeypatch):
    monkeypatch.setenv(serve.AUTH_ENV, "bob:env-pass")
    url = served(host="0.0.0.0")  # refused without auth; the environment variable provides it
    assert_refused_without_login(url)
    assert_login(url, "bob", "env-pass")


@pytest.mark.parametrize("host,share", [("0.0.0.0", False), ("192.168.1.10", False), ("127.0.0.1", True)])
def test_refused_exposure_fails_before_the_app_is_built(monkeypatch, host, share):
    monkeypatch.delenv(serve.AUTH_ENV, raising=False)
    app = ui_app
    built = []
    real_build = app.build_app
    monkeypatch.setattr(app, "build_app", lambda *a, **k: built.append(1) or real_build(*a, **k))
    with pytest.raises(ConfigError, match="refusing"):
        ui_app.launch(host=host, share=share, port=free_port(), block=False)
    assert not built


def test_cli_refusal_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv(serve.AUTH_ENV, raising=False)
    assert ui_app.main(["--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ui: refusing to listen on 0.0.0.0") and "Traceback" not in err
