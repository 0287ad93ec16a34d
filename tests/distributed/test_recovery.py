"""The recovery policy's decisions, pure (no Ray): each test pins one decision a wrong policy would get wrong.

The facts are those of a run with MIN = 2, MAX = 4 workers and ``--placement-timeout 30``;
a failure is being handled when ``recoveries`` ≥ 1. The last tests check that the worker
pool asks the policy (a stand-in pool of slots that never get placed, so nothing calls Ray).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from ddray.distributed.recovery import MAX_RECOVERIES, Action, Decision, Facts, RecoveryPolicy

POLICY = RecoveryPolicy()
RUN = Facts(alive=4, min_alive=2, timeout=30.0)  # nothing failed, every worker answers


def decide(**facts: Any) -> Action:
    return POLICY.decide(replace(RUN, **facts)).action


def test_enough_workers_and_no_failure_go_on() -> None:
    assert decide() is Action.GO_ON
    assert decide(alive=2) is Action.GO_ON  # exactly MIN is enough


def test_below_min_waits_for_capacity_until_the_timeout() -> None:
    assert decide(alive=1, waited=29.9) is Action.WAIT
    assert decide(alive=0, waited=0.0) is Action.WAIT


def test_below_min_at_the_timeout_stops() -> None:
    assert decide(alive=1, waited=30.0) is Action.STOP
    assert decide(alive=1, waited=300.0) is Action.STOP


def test_the_timeout_does_not_stop_a_run_that_has_min() -> None:
    assert decide(alive=2, waited=300.0) is Action.GO_ON


def test_a_lost_worker_with_min_left_shrinks() -> None:
    assert decide(recoveries=1, workers_lost=2, alive=2) is Action.SHRINK


def test_a_lost_worker_below_min_waits_then_stops() -> None:
    assert decide(recoveries=1, workers_lost=3, alive=1) is Action.WAIT
    assert decide(recoveries=1, workers_lost=3, alive=1, waited=30.0) is Action.STOP


def test_a_failure_that_lost_an_actor_but_no_worker_is_redone() -> None:
    """A graph or task failed with a loss, yet every worker answers as the same process: redo the step."""
    assert decide(recoveries=1, workers_lost=0, loss=True) is Action.SHRINK


def test_a_lost_server_restarts_whatever_else_happened() -> None:
    assert decide(recoveries=1, servers_lost=True) is Action.RESTART
    assert decide(recoveries=1, servers_lost=True, alive=0, waited=300.0) is Action.RESTART
    assert decide(recoveries=1, servers_lost=True, loss=False) is Action.RESTART


def test_an_error_that_lost_no_actor_is_raised() -> None:
    assert decide(recoveries=1, loss=False, workers_lost=0) is Action.RAISE


def test_an_error_with_a_lost_worker_is_a_loss_after_all() -> None:
    """The error read first may be a downstream one; a share whose worker was lost makes it a loss."""
    assert decide(recoveries=1, loss=False, workers_lost=1, alive=3) is Action.SHRINK


def test_an_error_outside_a_failure_is_not_raised() -> None:
    assert decide(recoveries=0, loss=False) is Action.GO_ON


def test_the_budget_allows_max_recoveries_in_a_row() -> None:
    assert decide(recoveries=MAX_RECOVERIES, workers_lost=1, alive=3) is Action.SHRINK


def test_past_the_budget_the_run_gives_up_even_over_a_lost_server() -> None:
    decision = POLICY.decide(replace(RUN, recoveries=MAX_RECOVERIES + 1, servers_lost=True))
    assert decision.action is Action.GIVE_UP
    assert decision.why == f"gave up after {MAX_RECOVERIES} recoveries"  # the end of the RuntimeError's message


def test_the_budget_is_a_fact() -> None:
    assert decide(recoveries=3, budget=2) is Action.GIVE_UP
    assert decide(recoveries=3, budget=3, workers_lost=1, alive=3) is Action.SHRINK


def test_only_give_up_and_restart_are_final() -> None:
    final = {a for a in Action if Decision(a, "").final}
    assert final == {Action.GIVE_UP, Action.RESTART}


def test_facts_gathered_later_never_change_a_final_decision() -> None:
    """Fleet.recover stops gathering facts once the decision is final: that must be safe for every fact."""
    for recoveries, servers, lost, loss, alive, waited in itertools.product(
            (0, 1, MAX_RECOVERIES + 1), (False, True), (0, 1, 3), (False, True), (0, 1, 2, 4), (0.0, 30.0)):
        known = replace(RUN, recoveries=recoveries, alive=alive, waited=waited)
        first = POLICY.decide(known)
        if first.final:
            full = replace(known, servers_lost=servers, workers_lost=lost, loss=loss)
            assert POLICY.decide(full).action is first.action, full
        with_servers = replace(known, servers_lost=servers)
        second = POLICY.decide(with_servers)
        if second.final:
            full = replace(with_servers, workers_lost=lost, loss=loss)
            assert POLICY.decide(full).action is second.action, full


@pytest.mark.parametrize("field, value", [("alive", -1), ("min_alive", -1), ("recoveries", -1),
                                          ("workers_lost", -2), ("waited", -0.5)])
def test_negative_facts_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match="never negative"):
        replace(RUN, **{field: value})


# -- the pool asks the policy -------------------------------------------------------------------


class Scripted(RecoveryPolicy):
    """Answers with ``actions`` in turn and keeps the facts it was asked about."""

    def __init__(self, *actions: Action) -> None:
        self.actions, self.asked = list(actions), list[Facts]()

    def decide(self, facts: Facts) -> Decision:
        self.asked.append(facts)
        return Decision(self.actions.pop(0), "scripted")


def unplaced_pool(policy: RecoveryPolicy, count: int = 3, min_alive: int = 2, timeout: float = 30.0) -> Any:
    """A WorkerPool over ``count`` slots that are never placed: no actor is made, nothing calls Ray."""
    from ddray.distributed.pool import WorkerPool

    slots = SimpleNamespace(count=count, slots=[SimpleNamespace(placed=False)] * count, poll=lambda: [],
                            placed=lambda: [], pending=lambda: count)
    return WorkerPool(slots, lambda slot, where: None, min_alive, timeout, policy=policy)  # type: ignore[arg-type]


def test_the_pool_goes_on_when_the_policy_says_so() -> None:
    policy = Scripted(Action.GO_ON)
    unplaced_pool(policy).ensure()  # no worker answers, yet the policy let it go on
    assert policy.asked == [Facts(alive=0, min_alive=2, timeout=30.0, waited=policy.asked[0].waited)]


def test_the_pool_waits_while_the_policy_says_wait() -> None:
    policy = Scripted(Action.WAIT, Action.WAIT, Action.GO_ON)
    unplaced_pool(policy).ensure()
    assert len(policy.asked) == 3
    assert policy.asked[0].waited < policy.asked[2].waited  # the time waited grows between asks


def test_the_pool_stops_with_the_capacity_error_when_the_policy_says_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddray.distributed import pool
    from ddray.distributed.placement import CapacityError

    monkeypatch.setattr(pool, "cluster_summary", lambda: "1 alive node with CPU 1, GPU 0 in all")
    with pytest.raises(CapacityError) as e:
        unplaced_pool(Scripted(Action.STOP), timeout=5.0).ensure()
    assert str(e.value) == ("--placement-timeout 5: only 0 of the 2 worker(s) needed answered for 5 s; the "
                            "cluster has 1 alive node with CPU 1, GPU 0 in all")
