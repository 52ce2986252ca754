"""The Simulation Engine's instruction poller (`simulations.runner._waiting_nodes_poller`): it hands
the queue exactly the messages Flower's own loop would, asks the link state only about nodes with
a waiting instruction, and leaves any other link state to Flower."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from simulations.runner import _engine_polling, _waiting_nodes_poller


class _State:
    """An in-memory link state as far as the poller sees it: stored messages by id, each with a
    destination and a delivery time ("" until `get_message_ins` hands it out)."""

    def __init__(self, destinations: list[int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for i, node in enumerate(destinations)
        }
        self.asked: list[int] = []

    def get_message_ins(self, *, node_id: int, limit: int):
        self.asked.append(node_id)
        with self.lock:
            for message in self.message_ins_store.values():
                if message.metadata.dst_node_id == node_id and message.metadata.delivered_at == "":
                    message.metadata.delivered_at = "now"
                    return [message][:limit]
        return []


def _poll_until_drained(state, nodes: list[int], expected: int, original=None) -> list:
    """Runs the poller on its own thread until `expected` messages reached the queue."""
    received: queue.Queue = queue.Queue()
    stop = threading.Event()
    poller = _waiting_nodes_poller(original or (lambda *args: None))
    thread = threading.Thread(target=poller, args=(state, received, dict.fromkeys(nodes), stop))
    thread.start()
    try:
        messages = [received.get(timeout=10) for _ in range(expected)]
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    return messages


def test_only_nodes_with_a_waiting_instruction_are_asked_and_every_instruction_is_queued() -> None:
    state = _State(destinations=[3, 7, 7])  # node 7 has two instructions: one per poll
    messages = _poll_until_drained(state, nodes=list(range(10)), expected=3)
    assert sorted(m.metadata.dst_node_id for m in messages) == [3, 7, 7]
    assert set(state.asked) <= {3, 7}  # the eight idle nodes were never asked
    assert all(m.metadata.delivered_at == "now" for m in state.message_ins_store.values())


def test_a_link_state_of_another_kind_is_left_to_flowers_own_loop() -> None:
    handed = []

    def original(state, queue_, nodes_mapping, f_stop) -> None:
        handed.append(state)

    other = SimpleNamespace()  # no message store: not Flower 1.41's in-memory state
    _waiting_nodes_poller(original)(other, queue.Queue(), {}, threading.Event())
    assert handed == [other]


def test_the_poller_replaces_flowers_only_while_the_engine_runs() -> None:
    flowers = vce_api.add_messages_to_queue
    with _engine_polling():
        assert vce_api.add_messages_to_queue is not flowers
        assert vce_api.add_messages_to_queue.__qualname__.startswith("_waiting_nodes_poller")
    assert vce_api.add_messages_to_queue is flowers


def test_flowers_simulation_link_state_has_what_the_poller_reads() -> None:
    """Pins the Flower internals the poller relies on: the Simulation Engine's link state (built
    as `run_simulation` builds it) is in memory, with a lock and a dict of stored messages."""
    state = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    ).state()
    assert isinstance(state, InMemoryLinkState)
    assert isinstance(state.message_ins_store, dict)
    assert hasattr(state.lock, "acquire")
    assert state.get_message_ins(node_id=1, limit=1) == []
