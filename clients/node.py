"""A BU's node in a deployment: Flower's SuperNode, started for one BU with its key, the
deployment's CA and its node configuration.

`silofed deploy node --bu-config bu.toml --node-dir BUNDLE` checks everything it can before Flower
starts, and says what is wrong in the steward's terms rather than Flower's:

- a node key without TLS is refused (node authentication only means something over TLS);
- the key must be a private OpenSSH key readable by its owner only;
- the coordinator's certificate is checked against the CA given (none: the system's CAs) with a
  TLS handshake of its own, so a missing or wrong CA is named as such;
- a key the coordinator has not registered is reported with its fingerprint and the fix.

The node's configuration tells the ClientApp which `bu.toml` and home to use; the ClientApp
re-reads both for every message, so the BU's policy, consent and budget always apply as they
stand. Flower's state for this node (the installed app bundle) lives in the BU's home
(`HOME/flwr`), never in `~/.flwr`.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from federation.deployment import check_private, fingerprint, load_node_settings
from federation.processes import Child, flower_environment, flower_program
from privacy.errors import ConfigurationError, RunFailed
from privacy.unit_config import UnitConfig

DEFAULT_RUNTIME_PORT = 9094
CONNECT_SECONDS = 300.0
PROBE_SECONDS = 5.0


class NodeRefused(RunFailed):
    """The coordinator refused this node (its key is not registered) or could not be trusted."""

    exit_code = 2


@dataclass(frozen=True)
class NodeOptions:
    bu_config: Path
    home: Path | None
    coordinator: str | None
    ca: Path | None
    key: Path | None
    insecure: bool = False
    runtime_port: int = DEFAULT_RUNTIME_PORT
    connect_timeout: float = CONNECT_SECONDS


@dataclass(frozen=True)
class NodePlan:
    unit: str
    bu_config: Path
    home: Path
    coordinator: str
    ca: Path | None
    key: Path | None
    insecure: bool
    runtime_port: int
    connect_timeout: float
    fingerprint: str | None


def plan_node(options: NodeOptions, bundle: Path | None) -> NodePlan:
    """Resolve and check the node's settings: the bundle's `node.toml`, overridden by options."""
    config = UnitConfig.load(options.bu_config)
    chosen = options.home or config.home
    if chosen is None:
        raise ConfigurationError(
            f"unit '{config.unit}' has no home directory: set `home = \"...\"` in "
            f"{options.bu_config} or pass --home"
        )
    home = Path(chosen).resolve()
    coordinator, ca, key = options.coordinator, options.ca, options.key
    if bundle is not None:
        settings = load_node_settings(bundle)
        if settings.unit != config.unit:
            raise ConfigurationError(
                f"{bundle}: this node bundle is for unit '{settings.unit}', but "
                f"{options.bu_config} configures unit '{config.unit}'; use the bundle made for it"
            )
        coordinator = coordinator or settings.coordinator
        if not options.insecure:
            ca = ca or bundle / settings.ca
        key = key or bundle / settings.key
    if not coordinator:
        raise ConfigurationError(
            "--coordinator: give the coordinator's HOST:PORT (or --node-dir, the bundle whose "
            "node.toml names it)"
        )
    if options.insecure:
        if key is not None:
            raise ConfigurationError(
                "a node key was given with --insecure: node authentication works only over TLS "
                "(the key proves the node's identity inside the encrypted channel). Drop "
                "--insecure and give the deployment's CA with --ca"
            )
        if ca is not None:
            raise ConfigurationError("--insecure and --ca contradict each other; choose one")
    elif key is None:
        raise ConfigurationError(
            "--key: a deployed node authenticates with its private key (node.key in the node "
            "bundle, or one made with `silofed deploy keygen`)"
        )
    if ca is not None and not ca.is_file():
        raise ConfigurationError(f"--ca {ca}: no such file; use the ca.pem of the node bundle")
    public = None
    if key is not None:
        public = _check_key(key)
    for value, name in ((str(options.bu_config.resolve()), "bu.toml path"), (str(home), "home")):
        if "'" in value or '"' in value:
            raise ConfigurationError(
                f"the {name} {value!r} holds a quote; Flower's node config cannot carry it"
            )
    return NodePlan(
        unit=config.unit,
        bu_config=options.bu_config.resolve(),
        home=home,
        coordinator=coordinator,
        ca=ca.resolve() if ca is not None else None,
        key=key.resolve() if key is not None else None,
        insecure=options.insecure,
        runtime_port=options.runtime_port,
        connect_timeout=options.connect_timeout,
        fingerprint=public,
    )


def _check_key(path: Path) -> str:
    if not path.is_file():
        raise ConfigurationError(f"--key {path}: no such file; use node.key of the node bundle")
    check_private(path)
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigurationError(
            f"--key {path}: not an unencrypted OpenSSH private key ({err}); make one with "
            "`silofed deploy keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(
            f"--key {path}: node keys are ECDSA on a NIST curve (Flower's node authentication "
            "takes no other); make one with `silofed deploy keygen`"
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return fingerprint(public.decode())


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ConfigurationError(f"--coordinator {address!r}: write HOST:PORT")
    return host, int(port)


def probe_coordinator(plan: NodePlan) -> None:
    """Reach the coordinator and, over TLS, check its certificate against the CA, until the
    connect deadline. A certificate the CA did not sign fails at once: retrying cannot help."""
    host, port = _host_port(plan.coordinator)
    deadline = time.monotonic() + plan.connect_timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=PROBE_SECONDS) as raw:
                if plan.insecure:
                    return
                context = ssl.create_default_context(
                    cafile=str(plan.ca) if plan.ca is not None else None
                )
                with context.wrap_socket(raw, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as err:
            source = f"the CA in {plan.ca}" if plan.ca else "the system's CAs (no --ca given)"
            raise NodeRefused(
                f"the coordinator at {plan.coordinator} presented a certificate not signed by "
                f"{source} ({err.verify_message}); give the deployment's CA with --ca "
                "(ca.pem in the node bundle), and check the address is the coordinator's"
            ) from None
        except ssl.SSLError as err:
            raise NodeRefused(
                f"TLS with the coordinator at {plan.coordinator} failed ({err.reason}); is it "
                "a silofed coordinator, and is TLS on at both ends?"
            ) from None
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RunFailed(
                    f"no coordinator answered at {plan.coordinator} within "
                    f"{plan.connect_timeout:g} s ({err.strerror or err}); check the address and "
                    "that `silofed deploy coordinator` runs"
                ) from None
            time.sleep(1.0)


class RunningNode:
    """A running SuperNode for one BU."""

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        node_config = f"bu-config='{plan.bu_config}' home='{plan.home}'"
        command = [
            flower_program("flower-supernode"),
            "--superlink",
            plan.coordinator,
            "--node-config",
            node_config,
            "--isolation",
            "subprocess",
            "--port",
            str(plan.runtime_port),
            "--max-wait-time",
            str(plan.connect_timeout),
        ]
        if plan.insecure:
            command.append("--insecure")
        else:
            if plan.ca is not None:
                command += ["--root-certificates", str(plan.ca)]
            command += ["--auth-supernode-private-key", str(plan.key)]
        log = plan.home / "node" / "supernode.log"
        self.offset = log.stat().st_size if log.exists() else 0
        self.child = Child(
            command, env=flower_environment(plan.home / "flwr"), log=log, cwd=plan.home
        )

    def wait_connected(self, timeout: float | None = None) -> int:
        """Wait until the SuperLink admitted the node; return its node id. A refusal is raised
        in the steward's terms."""
        deadline = time.monotonic() + (timeout or self.plan.connect_timeout + 30)
        while True:
            text = self.child.output(self.offset)
            for line in text.splitlines():
                if "SuperNode ID:" in line:
                    return int(line.rsplit(":", 1)[1])
            if not self.child.running():
                raise self.failure(text)
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"the node did not connect to {self.plan.coordinator} in time; see "
                    f"{self.child.log}"
                )
            time.sleep(0.3)

    def failure(self, text: str | None = None) -> RunFailed:
        """Why the SuperNode stopped, from its log."""
        text = self.child.output(self.offset) if text is None else text
        plan = self.plan
        if "code: 2004" in text or "code: 2001" in text:
            return NodeRefused(
                f"the coordinator at {plan.coordinator} does not admit this node's key "
                f"({plan.fingerprint}): it is not enrolled, or was rotated. Send node.pub to the "
                "coordinator's operator (`silofed deploy enrol` / `silofed deploy rotate-key`), "
                "or use the key of the current node bundle. (A node restarted right after a "
                "crash is refused the same way until the coordinator has seen its old "
                "connection end, about a minute: then start it again.)"
            )
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return NodeRefused(
                f"the coordinator's certificate at {plan.coordinator} is not trusted; give the "
                "deployment's CA with --ca (ca.pem in the node bundle)"
            )
        if "Connection refused" in text or "Giving up reconnection" in text:
            return RunFailed(
                f"the coordinator at {plan.coordinator} stopped answering for longer than "
                f"{plan.connect_timeout:g} s; the node stopped (restart it once the coordinator "
                "is back)"
            )
        lines = [line for line in text.splitlines() if line.strip()]
        return RunFailed(
            f"flower-supernode stopped (exit {self.child.process.returncode}); last lines of "
            f"{self.child.log}:\n" + "\n".join(lines[-8:])
        )

    def running(self) -> bool:
        return self.child.running()

    def stop(self) -> int | None:
        return self.child.stop()
