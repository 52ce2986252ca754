"""The SuperLink's network guard: over the network only the Fleet API and the health check answer;
the Control and Runtime APIs answer on loopback only (Flower 1.41 serves all three on one port)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.superlink import FleetOnlyFromNetwork, install

PATHS = ["/v1/fleet/pull-messages", "/health", "/v1/control/register-node", "/v1/runtime/pull"]


def _app() -> Starlette:
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in PATHS])
    app.add_middleware(FleetOnlyFromNetwork)
    return app


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1"])
def test_loopback_reaches_every_api(host: str) -> None:
    client = TestClient(_app(), client=(host, 40000))
    assert [client.post(p).status_code for p in PATHS] == [200, 200, 200, 200]


@pytest.mark.parametrize("host", ["10.1.2.3", "192.168.0.7", "2001:db8::1", "testclient"])
def test_the_network_reaches_only_the_fleet_api_and_health(host: str) -> None:
    client = TestClient(_app(), client=(host, 40000))
    assert [client.post(p).status_code for p in PATHS] == [200, 200, 403, 403]
    refused = client.post("/v1/control/register-node")
    assert "only the Fleet API" in refused.json()["detail"]


def test_the_guard_is_installed_in_front_of_flowers_own_middleware() -> None:
    from flwr.superlink.main import _get_middleware

    install()
    install()  # twice: still one guard
    stack = [m.cls for m in _get_middleware()]
    assert stack[0] is FleetOnlyFromNetwork
    assert stack.count(FleetOnlyFromNetwork) == 1
