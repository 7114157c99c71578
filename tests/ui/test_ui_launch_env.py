"""`lite-srpo ui` address: --host/--port, else Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
127.0.0.1:7860 — and an address from the environment is refused without auth like one from a flag."""
import pytest

from lite_srpo.errors import ConfigError
from ui import app as ui_app
from ui import serve
from ui.serve import check_exposure, resolve_address


def test_address_precedence():
    assert resolve_address(env={}) == ("127.0.0.1", 7860)
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080"}
    assert resolve_address(env=env) == ("0.0.0.0", 8080)
    assert resolve_address("localhost", 9000, env=env) == ("localhost", 9000)  # flags win
    assert resolve_address(None, 9000, env=env) == ("0.0.0.0", 9000)
    assert resolve_address(env={"GRADIO_SERVER_NAME": "  ", "GRADIO_SERVER_PORT": ""}) == ("127.0.0.1", 7860)


@pytest.mark.parametrize("bad", ["http", "0", "70000", "-1", "80.5"])
def test_bad_port_variable_names_it(bad):
    with pytest.raises(ConfigError, match=rf"GRADIO_SERVER_PORT='{bad}' is not a port number"):
        resolve_address(env={"GRADIO_SERVER_PORT": bad})


def test_environment_address_still_needs_auth(monkeypatch, capsys):
    host, _ = resolve_address(env={"GRADIO_SERVER_NAME": "0.0.0.0"})
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        check_exposure(host, False, None)
    check_exposure(host, False, ("user", "pw"))  # with auth: allowed
    monkeypatch.delenv(serve.AUTH_ENV, raising=False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert ui_app.main([]) == 2  # the CLI path: refused before anything is served
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "nope")
    assert ui_app.main([]) == 2
    assert "GRADIO_SERVER_PORT='nope'" in capsys.readouterr().err
