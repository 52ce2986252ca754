"""Injected faults for rehearsing failures in simulation (`silofed simulate --fault KIND:BU:ROUND`).

A fault names a BU (by name or 0-based index) and a round (from 1). Implemented kinds:
`crash`: the BU's node dies when it is asked to compute in that round (under SecAgg+, after the
key exchange, which is the dropout SecAgg+ is built to survive). Flower client mods carry faults, so
the BU's own code is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from privacy.errors import ConfigurationError

KINDS = ("crash",)
_FIT_CONFIG = "fitins.config"


class InjectedCrash(RuntimeError):
    """The fault a simulated BU raises on purpose."""


@dataclass(frozen=True)
class Fault:
    kind: str
    unit: str
    server_round: int

    @classmethod
    def parse(cls, text: str, units: Sequence[str]) -> Fault:
        parts = text.split(":")
        if len(parts) != 3:
            raise ConfigurationError(
                f"--fault {text!r}: write KIND:BU:ROUND, e.g. crash:ecommerce:2"
            )
        kind, unit, round_text = parts
        if kind not in KINDS:
            raise ConfigurationError(
                f"--fault {text!r}: unknown kind '{kind}'; implemented: {', '.join(KINDS)}"
            )
        if unit.isdigit():
            if int(unit) >= len(units):
                raise ConfigurationError(
                    f"--fault {text!r}: BU index {unit} out of range 0..{len(units) - 1}"
                )
            unit = units[int(unit)]
        elif unit not in units:
            raise ConfigurationError(
                f"--fault {text!r}: no BU named '{unit}' (BUs: {', '.join(units)})"
            )
        if not round_text.isdigit() or int(round_text) < 1:
            raise ConfigurationError(f"--fault {text!r}: the round is a number from 1")
        return cls(kind, unit, int(round_text))


def fault_mod(faults: Sequence[Fault], units: Sequence[str]) -> Mod:
    """A client mod that makes the simulated node `partition-id` misbehave as `faults` say."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        unit = units[int(ctxt.node_config["partition-id"])]
        # the message that asks the BU to compute carries the fit instructions
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and _FIT_CONFIG in msg.content.config_records
        ):
            for fault in faults:
                if fault.unit == unit and msg.metadata.group_id == str(fault.server_round):
                    raise InjectedCrash(
                        f"injected fault: {fault.kind} of '{unit}' in round {fault.server_round}"
                    )
        return call_next(msg, ctxt)

    return mod
