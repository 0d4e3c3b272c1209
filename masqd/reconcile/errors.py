"""The reconciler's own error types: what its callers (the API, the spool, the migrator)
may catch without knowing the kernel layer.

Kernel failures (nftables refusing a command, a netlink or file error) are classified here,
at the boundary where the reconcile layer calls the backend (`kernel_boundary`), so that
`masqd.api` never imports `masqd.kernel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from masqd.kernel.backend import NftError


class ReconcileError(Exception):
    """Base of the errors the reconcile layer raises to its callers."""


class SyncUnavailable(ReconcileError):
    """A change was accepted but the kernel did not take it in time; says why."""


class KernelUnavailable(ReconcileError):
    """The kernel refused a command or could not be reached; the message is the kernel's."""


@contextlib.contextmanager
def kernel_boundary() -> Iterator[None]:
    """Turn the backend's failures (NftError, OSError) into `KernelUnavailable`, keeping
    their message, so that a caller above sees one error type of this layer."""
    try:
        yield
    except (NftError, OSError) as exc:
        raise KernelUnavailable(str(exc)) from exc
