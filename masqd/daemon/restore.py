"""The desired state at start-up: the journal first, then the kernel's table if need be.

The journal is replayed into the desired state (problems are reported, never fatal). At its
last sync marker the reconciler is seeded with what the kernel held then (`seed_from_marker`):
if the ruleset generation has not moved since, the first sync needs no listing.

Unless the journal proves it is complete (see `state.journal`), while masqd's table is in the
kernel, the attachments the table's element comments name and the journal does not are
recovered from it (`planning.recovery`) rather than wiped; a key the journal names, even as
deleted, is the journal's to decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from masqd.kernel.backend import Backend
from masqd.planning import recovery
from masqd.planning.desired import policy_fingerprint
from masqd.reconcile.reconciler import Reconciler
from masqd.state.desired import CapacityExceeded, DesiredState
from masqd.state.journal import Entry, Journal, Loaded

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """What start-up found, for the log and `/v1/status`."""

    found: bool = False  # a journal was there
    incomplete: str | None = "not loaded"  # why the journal is not proven complete
    problems: list[str] = field(default_factory=list)
    adopted: dict[str, int] | None = None  # recovered from the table: counts


def load_journal(state: DesiredState, journal: Journal, reconciler: Reconciler) -> Restored:
    """Replay the journal into `state`, seeding `reconciler` at its last marker."""

    def seed_from_marker(marker: Entry) -> None:
        # Everything replayed so far was in the kernel at the marker's generation: hand that
        # picture to the reconciler, which trusts it only if the generation has not moved.
        if marker.fingerprint != policy_fingerprint(reconciler.policy):
            return  # the policy changed since: the kernel's structure differs, list it
        assert marker.generation is not None
        elements = {name: dict(elems) for name, elems in state.elements.items()}
        reconciler.seed(reconciler.baseline(elements), marker.generation)
        state.take_dirty()

    loaded = Loaded()
    problems = state.replay(journal.stream(loaded), at_last_marker=seed_from_marker)
    if not loaded.complete:
        # A journal that may miss records does not say what the kernel held: list it.
        reconciler.forget_mirror()
    loaded.problems += problems
    for problem in loaded.problems:
        log.error("journal: %s", problem)
    log.info(
        "journal loaded: %d attachments%s",
        len(state),
        "" if loaded.found else " (no journal found: starting empty)",
    )
    return Restored(
        found=loaded.found,
        incomplete=None if loaded.complete else loaded.incomplete,
        problems=loaded.problems,
    )


async def recover_from_table(
    state: DesiredState, backend: Backend, table: str, restored: Restored
) -> None:
    """Take over the attachments that the kernel's table names and the journal does not.
    They go through `state` like any setup, so the journal holds them from then on."""
    try:
        observation = await backend.observe()
    except Exception as exc:
        log.error("cannot list table inet %s to adopt it: %s", table, exc)
        return
    if observation.table.structure is None:
        if restored.found:
            log.warning(
                "journal not proven complete (%s), and table inet %s is not in the kernel: "
                "nothing to adopt, starting from what the journal holds",
                restored.incomplete,
                table,
            )
        return
    found = recovery.recover(observation.table)
    unreadable = list(found.unreadable)
    taken = 0
    # The journal speaks for every key it names, deleted ones included: the last record
    # readable for a key wins over the table (a delete journalled but not yet applied
    # when the daemon died must not come back). Only keys it never names are adopted.
    deleted = state.replayed_deletes
    for key, ips in found.attachments.items():
        if state.get(key) is not None or key in deleted:
            continue
        try:
            state.put(key, ips)
        except CapacityExceeded:
            unreadable.append(f"{'/'.join(key)}: beyond --max-attachments")
            continue
        taken += 1
    restored.adopted = {"attachments": taken, "unreadable": len(unreadable)}
    log.warning(
        "%s, but table inet %s is in the kernel: adopted %d attachments the journal does "
        "not name from its element comments; %d elements unreadable (they will be removed)",
        f"journal not proven complete ({restored.incomplete})" if restored.found else "no journal",
        table,
        taken,
        len(unreadable),
    )
    for item in unreadable[:20]:
        log.warning("not adopted: %s", item)


async def restore(
    state: DesiredState, journal: Journal, reconciler: Reconciler, backend: Backend, table: str
) -> Restored:
    """The journal, then (unless it is proven complete) the table; see the module's doc."""
    restored = load_journal(state, journal, reconciler)
    if restored.incomplete is not None:
        await recover_from_table(state, backend, table, restored)
    # The deletes the journal replayed mattered only to the recovery.
    state.replayed_deletes = set()
    return restored
