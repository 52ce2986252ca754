"""Flower's SuperLink, serving only its Fleet API to the network.

Flower 1.41 serves its Fleet API (what BU nodes use), its Control API (register node keys, submit
and stop runs) and its Runtime API (what the ServerApp uses to send instructions and read the BUs'
replies) on one port, and the open-source SuperLink has no account authentication on the latter
two. Anyone who could reach the coordinator's port could then register a key of their own, and so
connect as a node, or read the replies of a run: node authentication would mean nothing.

`python -m server.superlink ARGS` runs Flower's own `flower-superlink ARGS` with one ASGI
middleware in front of Flower's: a request from any address other than loopback may reach only the
Fleet API and the health check; everything else is refused with 403 before Flower sees it. The
coordinator's own tools (`flwr`, the ServerApp) run on its machine and reach it over loopback.
The middleware goes in through Flower's extension hook (`flwr.superlink.extensions`), and
`install()` fails loudly if that hook is gone, rather than run without the guard.
"""

from __future__ import annotations

import ipaddress
import json
import sys

from starlette.middleware import Middleware

NETWORK_PATHS = ("/v1/fleet/", "/health")
REFUSAL = {
    "detail": "silofed: only the Fleet API is served to the network; the Control and Runtime "
    "APIs answer on the coordinator's own machine only"
}


def _loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False  # an address the server cannot name is not trusted
    host = client[0]
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class FleetOnlyFromNetwork:
    """ASGI middleware: non-loopback clients reach only `NETWORK_PATHS`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not _loopback(scope.get("client")):
            path = scope.get("path", "")
            if not path.startswith(NETWORK_PATHS):
                body = json.dumps(REFUSAL).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def install() -> None:
    """Put the guard in front of every SuperLink app this process creates."""
    from flwr.superlink import extensions

    original = getattr(extensions, "get_middleware", None)
    if original is None:
        raise RuntimeError(
            "flwr.superlink.extensions.get_middleware is gone (a Flower upgrade?); silofed will "
            "not start a SuperLink whose Control API the network could reach"
        )
    if getattr(original, "silofed_guard", False):
        return

    def get_middleware() -> tuple[Middleware, ...]:
        return (Middleware(FleetOnlyFromNetwork), *original())

    get_middleware.silofed_guard = True  # type: ignore[attr-defined]
    extensions.get_middleware = get_middleware


def main() -> None:
    install()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
