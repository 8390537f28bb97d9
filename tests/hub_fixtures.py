"""Pytest plugin: the local Hub-protocol server (tests/hub_server.py) as fixtures.

Loaded by tests/conftest.py, which sets HF_ENDPOINT=http://127.0.0.1:$TEST_HUB_PORT (and
HF_HUB_DISABLE_XET, HF_HOME, ...) before huggingface_hub is imported anywhere.

* ``hub_server`` (session): the running server, with users alice and bob and the
  organisation ``abliterators`` (member: alice).
* ``hub`` (function): the same server, emptied of repos, logged requests and pending
  faults, so that every test starts from a clean Hub.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.hub_server import HubServer

ALICE_TOKEN = "hf_test_alice_token_0123456789"
BOB_TOKEN = "hf_test_bob_token_9876543210"
ORG = "abliterators"
TOKENS = {ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}
ORGS = {ORG: ["alice"]}


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    server = HubServer(port=int(os.environ["TEST_HUB_PORT"]), tokens=TOKENS, orgs=ORGS)
    with server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer) -> Iterator[HubServer]:
    hub_server.reset()
    yield hub_server
    assert not hub_server.errors, "test Hub server crashed:\n" + "\n".join(hub_server.errors)
