"""Where a search's runs happen: one after another in this process (the default), or at the same
time as Ray tasks on a cluster. The runs are the same either way: each is a deterministic function
of its inputs, run with the same number of PyTorch threads, so a cluster changes how long a search
takes, never what it finds.

Ray core tasks, not Ray Tune: netshrink's searches choose their next runs from the last round's
results by their own rules (``auto``'s bisection of a byte budget), which is what a round of
tasks is; Tune's trial directories, searchers and schedulers would add nothing but weight. Ray
transports the model and data between processes of the user's own cluster with its own
serialization; no file from elsewhere is unpickled.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..errors import NetshrinkError
from ..training.ray_cluster import check_address_value, connect, failed_on_cluster, fits_threads


def _with_threads(function: Callable, threads: int, shared, job):
    """``function(shared, job)`` with ``threads`` PyTorch threads (a cluster worker starts with
    one; results of some kernels depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(shared, job)
    finally:
        torch.set_num_threads(before)


class Runner:
    """Runs ``function(shared, job)`` for rounds of jobs. ``address``: None for this process, a Ray
    cluster's address (``"ray://head:10001"``, ``"auto"`` for the cluster this machine is in), or
    ``"local"`` for a Ray cluster started on this machine. ``shared`` is sent to the cluster once.
    Entering it as a context manager connects, for the rest of the search."""

    def __init__(self, function: Callable, shared, address: str | None = None) -> None:
        if address is not None:
            check_address_value(address)
        self.function, self.shared, self.address = function, shared, address
        self.threads = torch.get_num_threads()
        self._stack = contextlib.ExitStack()
        self._remote = self._shared_ref = None

    def __enter__(self) -> "Runner":
        if self.address is not None:
            ray = self._stack.enter_context(connect(self.address))
            fits_threads(ray, self.threads)
            self._remote = ray.remote(num_cpus=self.threads)(_with_threads)
            self._errors = ray.exceptions.RayTaskError
            self._shared_ref = ray.put(self.shared)
            self._get = ray.get
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def run(self, jobs: list) -> list:
        """Every job's result, in the order of ``jobs``."""
        if self._remote is None:
            return [_with_threads(self.function, self.threads, self.shared, job) for job in jobs]
        refs = [self._remote.remote(self.function, self.threads, self._shared_ref, job) for job in jobs]
        try:
            return self._get(refs)
        except self._errors as exc:  # the run's own error, as it would be in this process: one line
            cause = getattr(exc, "cause", None)
            if isinstance(cause, NetshrinkError):
                raise NetshrinkError(str(cause)) from None
            raise NetshrinkError(failed_on_cluster("a run", cause)) from None
