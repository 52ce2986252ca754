"""silofed.federation: the contract between the coordinator and the BU clients.

Job specifications (pydantic), feature and model definitions, the wire format of every round's
messages, and the `silofed` command line (`federation/cli.py`).
"""
