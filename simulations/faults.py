"""Injected faults for rehearsing failures in simulation (`silofed simulate --fault KIND:BU:ROUND`).

A fault names a BU (by name or 0-based index) and a round (from 1); it acts on every exchange of
that round the BU is asked to compute in (`crash`, `timeout`) or on its model update of that round
(the others). Kinds:
- `crash`: the BU's node dies when asked to compute (under SecAgg+, after the key exchange, which
  is the dropout SecAgg+ is built to survive);
- `timeout`: the node answers, but only after the round's deadline has passed;
- `nan`: the update holds a NaN; `shape`: one array has an extra value; `dtype`: the arrays are
  float64 where the model is float32 (or the other way round);
- `inflated-weight`: the update claims 10^12 customers;
- `sign-flip`: the update goes the other way (global - (update - global));
- `scaled`: the update is 100 times as large (global + 100 (update - global)).
The first six are what validation and quorum must absorb; the last two are well-formed hostile
updates that only a robust aggregation rule (`aggregation.rule`) bounds.

Flower client mods carry faults in a Flower simulation (`fault_mod`), and `tampered` is the same
change for the in-process federation, so the BU's own code is untouched either way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from federation.job import Job
from federation.wire import Instruction, Phase
from privacy.errors import ConfigurationError

KINDS = (
    "crash",
    "timeout",
    "nan",
    "shape",
    "dtype",
    "inflated-weight",
    "sign-flip",
    "scaled",
)
UPDATE_KINDS = ("nan", "shape", "dtype", "inflated-weight", "sign-flip", "scaled")
SCALE = 100.0
INFLATED_WEIGHT = 10**12
LATE_BY = 2.0  # seconds past the deadline at which a `timeout` BU answers
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
                f"--fault {text!r}: unknown kind '{kind}'; one of {', '.join(KINDS)}"
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

    def __str__(self) -> str:
        return f"{self.kind}:{self.unit}:{self.server_round}"


def check_faults(faults: Sequence[Fault], job: Job) -> None:
    """Refuse faults the job cannot show: under SecAgg+ a tampered update is masked into the sum,
    which no one (by design) can inspect, and it would rehearse nothing silofed checks."""
    tampering = [f for f in faults if f.kind in UPDATE_KINDS]
    if tampering and job.secure_aggregation.enabled:
        raise ConfigurationError(
            f"--fault {tampering[0]}: a tampered update is hidden in SecAgg+'s masked sum, where "
            "the coordinator cannot inspect it; rehearse it without --secure-aggregation, or "
            "rehearse crash and timeout under it"
        )
    for fault in faults:
        if fault.server_round > job.rounds:
            raise ConfigurationError(f"--fault {fault}: the job has {job.rounds} rounds")


def tampered(
    kind: str, sent: list[np.ndarray], arrays: list[np.ndarray], weight: int
) -> tuple[list[np.ndarray], int]:
    """The update a BU with fault `kind` replies instead of (`arrays`, `weight`), given the global
    parameters it was `sent`."""
    arrays = [np.array(a, copy=True) for a in arrays]
    match kind:
        case "nan":
            arrays[0].flat[0] = np.nan
        case "shape":
            arrays[0] = np.append(arrays[0], arrays[0].flat[:1])
        case "dtype":
            arrays = [a.astype(np.float32 if a.dtype == np.float64 else np.float64) for a in arrays]
        case "inflated-weight":
            weight = INFLATED_WEIGHT
        case "sign-flip":
            arrays = [(2 * g - a).astype(a.dtype) for g, a in zip(sent, arrays, strict=True)]
        case "scaled":
            arrays = [
                (g + SCALE * (a - g)).astype(a.dtype) for g, a in zip(sent, arrays, strict=True)
            ]
        case _:
            raise ValueError(f"'{kind}' does not tamper with an update")
    return arrays, weight


def active(faults: Sequence[Fault], unit: str, server_round: int, phase: Phase) -> list[Fault]:
    """The faults of `unit` acting on its reply to `phase` of `server_round`."""
    return [
        f
        for f in faults
        if f.unit == unit
        and f.server_round == server_round
        and (f.kind not in UPDATE_KINDS or phase is Phase.TRAIN)
    ]


def misbehave_before(acting: Sequence[Fault], deadline: float | None) -> None:
    """What a BU with these faults does before it computes: a `crash` raises, a `timeout`
    sleeps past `deadline` (the round's, in seconds)."""
    for fault in acting:
        if fault.kind == "crash":
            raise InjectedCrash(f"injected fault: {fault}")
        if fault.kind == "timeout":
            if deadline is None:
                raise ConfigurationError(f"--fault {fault}: the run has no round deadline")
            time.sleep(deadline + LATE_BY)


def tampered_by(
    acting: Sequence[Fault], sent: list[np.ndarray], arrays: list[np.ndarray], weight: int
) -> tuple[list[np.ndarray], int]:
    """The update after every tampering fault among `acting` (see `tampered`)."""
    for fault in acting:
        if fault.kind in UPDATE_KINDS:
            arrays, weight = tampered(fault.kind, sent, arrays, weight)
    return arrays, weight


def fault_mod(faults: Sequence[Fault], units: Sequence[str], *, deadline: float | None) -> Mod:
    """A client mod that makes the simulated node `partition-id` misbehave as `faults` say;
    `deadline`: the round's deadline in seconds, which a `timeout` BU overruns."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if (
            msg.metadata.message_type != MessageType.TRAIN
            or _FIT_CONFIG not in msg.content.config_records
        ):
            return call_next(msg, ctxt)  # SecAgg+'s own stages carry no fit instructions
        unit = units[int(ctxt.node_config["partition-id"])]
        ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        instruction = Instruction.from_config(ins.config)
        acting = active(faults, unit, instruction.server_round, instruction.phase)
        misbehave_before(acting, deadline)
        reply = call_next(msg, ctxt)
        if not any(f.kind in UPDATE_KINDS for f in acting) or reply.has_error():
            return reply
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays, weight = tampered_by(
            acting,
            parameters_to_ndarrays(ins.parameters),
            parameters_to_ndarrays(res.parameters),
            res.num_examples,
        )
        res.parameters, res.num_examples = ndarrays_to_parameters(arrays), weight
        reply.content = compat.fitres_to_recorddict(res, keep_input=True)
        return reply

    return mod
