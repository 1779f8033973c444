"""`--api-key`: work needs `Authorization: Bearer <key>`; health, metrics, version and the API description
stay open; misses are OpenAI-style 401s; the flag and its environment variable reach the app."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest

from server import cli
from server.settings import ServerSettings
from tests.server_helpers import FakeEngine, serve

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def url():
    with serve({"fake": FakeEngine()}, settings=ServerSettings(api_key=KEY, shutdown_timeout_s=2.0)) as base:
        yield base


@pytest.mark.parametrize("headers, message", [
    ({}, "No API key provided"),
    ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
    ({"Authorization": f"Bearer {KEY}x"}, "Incorrect API key"),
    ({"Authorization": f"Basic {KEY}"}, "No API key provided"),  # only the Bearer scheme carries it
])
@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
    ("POST", "/v1/embeddings"), ("POST", "/rerank"),
])
def test_requests_without_the_key_are_401(url, headers, message, method, path):
    body = {"model": "fake", "prompt": "hi", "max_tokens": 2} if method == "POST" else None
    r = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=10)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)


def test_the_key_opens_every_route(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["fake"]
    out = client.completions.create(model="fake", prompt="hi", max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    r = httpx.post(f"{url}/tokenize", json={"model": "fake", "prompt": "hi"},
                   headers={"authorization": f"bearer {KEY}"}, timeout=10)  # the scheme is case-insensitive
    assert r.status_code == 200, r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=30).models.list()


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version", "/openapi.json"])
def test_probes_stay_open(url, path):
    assert httpx.get(f"{url}{path}", timeout=10).status_code == 200


def test_flag_and_environment_reach_the_app(monkeypatch):
    import uvicorn

    import server.app

    seen = {}
    engine = SimpleNamespace(info=SimpleNamespace(name="m", task="embed", path="m"),
                             stats=lambda: SimpleNamespace(num_blocks_total=0))
    monkeypatch.setattr(cli, "model_task", lambda model: "embed")
    monkeypatch.setattr(cli, "build_engine", lambda *a: engine)
    monkeypatch.setattr(server.app, "create_app", lambda engines, served, settings, metrics: seen.update(s=settings))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    cli.serve(cli.build_parser().parse_args(["serve", "--model", "m", "--api-key", KEY]))
    assert seen["s"].api_key == KEY
    monkeypatch.setenv("KVSERVE_API_KEY", "from-env")
    cli.serve(cli.build_parser().parse_args(["serve", "--model", "m"]))
    assert seen["s"].api_key == "from-env"
    monkeypatch.delenv("KVSERVE_API_KEY")
    cli.serve(cli.build_parser().parse_args(["serve", "--model", "m"]))
    assert seen["s"].api_key is None
    with pytest.raises(ValueError):
        ServerSettings(api_key="")
