"""The SuperLink's network guard: over the network only the Fleet API and the health check answer;
the Control and Runtime APIs answer on loopback only (Flower 1.41 serves all three on one port).
The middleware is driven as ASGI directly, with the client address a server would see."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.superlink import FleetOnlyFromNetwork, install

PATHS = ["/v1/fleet/pull-messages", "/health", "/v1/control/register-node", "/v1/runtime/pull"]


async def _inner(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _request(path: str, client: tuple[str, int] | None) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "client": client, "headers": []}
    asyncio.run(FleetOnlyFromNetwork(_inner)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1"])
def test_loopback_reaches_every_api(host: str) -> None:
    assert [_request(p, (host, 40000))[0] for p in PATHS] == [200, 200, 200, 200]


@pytest.mark.parametrize("client", [("10.1.2.3", 1), ("192.168.0.7", 1), ("2001:db8::1", 1), None])
def test_the_network_reaches_only_the_fleet_api_and_health(client) -> None:
    assert [_request(p, client)[0] for p in PATHS] == [200, 200, 403, 403]
    status, body = _request("/v1/control/register-node", client)
    assert status == 403
    assert "only the Fleet API" in json.loads(body)["detail"]


def test_the_guard_is_installed_in_front_of_flowers_own_middleware() -> None:
    from flwr.superlink.main import _get_middleware

    install()
    install()  # twice: still one guard
    stack = [m.cls for m in _get_middleware()]
    assert stack[0] is FleetOnlyFromNetwork
    assert stack.count(FleetOnlyFromNetwork) == 1
