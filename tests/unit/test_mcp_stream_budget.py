"""StreamBudget: GET streams open per (server, subject, actor) in one process; a place comes back however the
stream ends (an error included), and a principal with nothing open leaves nothing behind."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import pytest

from broker.errors import RateLimited
from broker.identity.spiffe import parse_spiffe_id
from broker.mcp.sessions import StreamBudget
from tests.unit.test_mcp_answers import make_principal

ALICE = make_principal()
ALICE_OTHER_AGENT = dataclasses.replace(ALICE, actor=parse_spiffe_id("spiffe://example.org/agents/other"))
BOB = dataclasses.replace(ALICE, subject="bob")


def test_the_budget_is_per_server_subject_and_actor() -> None:
    budget = StreamBudget()
    with ExitStack() as held:
        for _ in range(3):
            held.enter_context(budget.hold("expenses", ALICE, 3))
        with pytest.raises(RateLimited) as refused:
            held.enter_context(budget.hold("expenses", ALICE, 3))
        assert refused.value.reason == "mcp_streams_exhausted" and refused.value.status == 429
        assert budget.held("expenses", ALICE) == 3  # the refusal took no place
        for other in (("expenses", BOB), ("expenses", ALICE_OTHER_AGENT), ("travel", ALICE)):
            with budget.hold(other[0], other[1], 3):
                assert budget.held(*other) == 1
    assert budget.held("expenses", ALICE) == 0 and budget._open == {}


def test_a_stream_ending_in_an_error_gives_its_place_back() -> None:
    budget = StreamBudget()
    with pytest.raises(ConnectionResetError), budget.hold("expenses", ALICE, 1):
        raise ConnectionResetError
    with budget.hold("expenses", ALICE, 1):
        assert budget.held("expenses", ALICE) == 1
    assert budget._open == {}
