"""Client-side controls on outgoing Flower messages (Flower client mods).

`secure_aggregation_mod` hands SecAgg+ messages to Flower's `secaggplus_mod`, which masks the BU's
reply so that the coordinator sees only the sum, and refuses to answer in plaintext a job that asked
for secure aggregation: a coordinator that skips SecAgg+ must not receive one BU's update.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from federation.wire import Instruction
from privacy.errors import ConfigurationError

_FIT_CONFIG = "fitins.config"


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    if _FIT_CONFIG in msg.content.config_records:
        instruction = Instruction.from_config(dict(msg.content.config_records[_FIT_CONFIG]))
        if instruction.job.secure_aggregation.enabled:
            raise ConfigurationError(
                "the job requires secure aggregation, but the coordinator sent a plain train "
                "message; this BU does not send its update unmasked. Check that the ServerApp "
                "runs the SecAgg+ workflow."
            )
    return call_next(msg, ctxt)
