"""The event pause around whole-table transactions lives in the backend
(`backend.paused_events`): the fake's subscription is paused as the kernel's is, its own
whole-table commit is never told to the sink, and a commit made before the subscription is
back is reported (`Applied.missed_events`), for which the reconciler lists the table.
The kernel's side: tests/test_events.py."""

from __future__ import annotations

from masqd.kernel.fake import FakeBackend, dump_table
from masqd.metrics import Metrics
from masqd.planning.ruleset import SOURCES4, Policy
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import DesiredState

TABLE = "masqd"
STRAY = "198.18.61.9"


class Sink:
    def __init__(self) -> None:
        self.table: list[int | None] = []
        self.other: list[int] = []
        self.lost = 0

    def table_changed(self, generation: int | None) -> None:
        self.table.append(generation)

    def other_tables_changed(self, generation: int) -> bool:
        self.other.append(generation)
        return False

    def events_lost(self) -> None:
        self.lost += 1


def _reconciler(backend: FakeBackend, state: DesiredState) -> Reconciler:
    return Reconciler(state=state, backend=backend, table=TABLE, policy=Policy(), metrics=Metrics())


async def test_a_whole_table_commit_is_not_echoed_and_a_partial_one_is() -> None:
    backend = FakeBackend(table=TABLE)
    state = DesiredState()
    reconciler = _reconciler(backend, state)
    sink = Sink()
    events = await backend.subscribe(sink)
    assert await reconciler.sync_once()  # creates the table: a whole-table transaction
    assert backend.applied[-1].recreate
    events.pump()
    assert sink.table == []
    state.put(("net", "a", "eth0"), ["198.18.1.2/24"])
    reconciler.request()
    assert await reconciler.sync_once()
    assert not backend.applied[-1].recreate
    events.pump()
    assert sink.table == [await backend.generation()]


async def test_a_commit_before_the_events_are_back_is_reported_and_repaired() -> None:
    backend = FakeBackend(table=TABLE)
    state = DesiredState()
    state.put(("net", "a", "eth0"), ["198.18.1.2/24"])
    reconciler = _reconciler(backend, state)
    events = await backend.subscribe(reconciler)
    reconciler.events = events
    resume = events.resume

    def tamper_then_resume() -> None:
        # After our whole-table commit, before the subscription is back: no event tells.
        ref = {"family": "inet", "table": TABLE, "name": SOURCES4, "elem": [STRAY]}
        backend.execute({"nftables": [{"add": {"element": ref}}]})
        events.resume = resume  # type: ignore[method-assign]
        resume()

    events.resume = tamper_then_resume  # type: ignore[method-assign]
    assert await reconciler.sync_once()
    assert STRAY in backend.dump()
    assert reconciler.runner.full_needed  # asked for by `Applied.missed_events`
    assert await reconciler.sync_once()
    assert STRAY not in backend.dump()
    assert backend.dump() == dump_table(reconciler.baseline(state.elements))
    assert reconciler.stats.drift_repairs == 1
