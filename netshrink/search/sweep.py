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
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import NetshrinkError, first_line


def _with_threads(function: Callable, threads: int, shared, job):
    """``function(shared, job)`` with ``threads`` PyTorch threads (a cluster worker starts with
    one; results of some kernels depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(shared, job)
    finally:
        torch.set_num_threads(before)


def _import_ray(address: str):
    try:
        import ray
    except ImportError:
        raise NetshrinkError(f"address={address!r} runs on Ray, which is not installed: pip install 'ray>=2.9' "
                             "(or netshrink[distributed])") from None
    return ray


CONNECT_SECONDS = 3  # a cluster's head answers a TCP connection at once; nothing listening fails here


def _head(address: str) -> tuple[str, int] | None:
    """(host, port) of a head node's address written ``host:port`` (its GCS port, 6379 by default)."""
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if host and "://" not in address and port.isdigit() else None


@contextlib.contextmanager
def _ray(address: str) -> Iterator[object]:
    ray = _import_ray(address)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            raise NetshrinkError(f"cannot reach the Ray cluster at {address!r}: {first_line(exc, None)}"
                                 f"{_token_hint(address)}") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _token_hint(address: str) -> str:
    """Why a head that answers may still refuse: a cluster `ray start` made (Ray 2.5x and later)
    wants the token it saved, and Ray sends it to an address given as host:port only when told to
    (so that it never hands the token to a host by mistake)."""
    if _head(address) is None or os.environ.get("RAY_AUTH_MODE") or not (Path.home() / ".ray" / "auth_token").is_file():
        return ""
    return ("; if that cluster uses Ray's token authentication (the default of `ray start`), run with "
            "RAY_AUTH_MODE=token so Ray sends your ~/.ray/auth_token, or use --ray alone on one of its machines")


def check_address(address: str | None, threads: int | None = None) -> float | None:
    """Before any long work: refuse an address that is not one, one Ray is not installed to reach,
    one where nothing answers (in seconds, not after Ray's minute of retries), or a cluster with no
    node that can run a task of ``threads`` CPUs. Returns the cluster's CPUs (None without an
    address; for ``"local"``, this machine's, the cluster being started when the search is)."""
    if address is None:
        return None
    _check_address_value(address)
    _import_ray(address)
    if address == "local":
        return float(os.cpu_count() or 1)
    head = _head(address)
    if head is not None:
        try:
            socket.create_connection(head, timeout=CONNECT_SECONDS).close()
        except OSError as exc:
            raise NetshrinkError(f"nothing answers at {address} ({exc.strerror or exc}): start the cluster there "
                                 "(`ray start --head --port PORT`) or give its address ('auto' on one of its "
                                 "machines, host:port of its head, or ray://host:10001)") from None
    with _ray(address) as ray:
        return _fits_threads(ray, threads or torch.get_num_threads())


def _check_address_value(address) -> None:
    if not isinstance(address, str) or not address.strip():
        raise NetshrinkError(f"address must be a Ray cluster address such as 'auto', 'local', 'host:6379' or "
                             f"'ray://host:10001'. Received: address={address!r}")


def _fits_threads(ray, threads: int) -> float:
    """The cluster's CPUs, once it is known that some node runs a task of ``threads`` CPUs."""
    widest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if widest < threads:  # such a task would wait for ever
        raise NetshrinkError(f"every run uses {threads} PyTorch threads (as in this process), but no "
                             f"node of the Ray cluster has {threads} CPUs (largest: {widest:g}): set "
                             f"torch.set_num_threads({int(widest) or 1}) first")
    return float(ray.cluster_resources().get("CPU", 0))


class Runner:
    """Runs ``function(shared, job)`` for rounds of jobs. ``address``: None for this process, a Ray
    cluster's address (``"ray://head:10001"``, ``"auto"`` for the cluster this machine is in), or
    ``"local"`` for a Ray cluster started on this machine. ``shared`` is sent to the cluster once.
    Entering it as a context manager connects, for the rest of the search."""

    def __init__(self, function: Callable, shared, address: str | None = None) -> None:
        if address is not None:
            _check_address_value(address)
        self.function, self.shared, self.address = function, shared, address
        self.threads = torch.get_num_threads()
        self._stack = contextlib.ExitStack()
        self._remote = self._shared_ref = None

    def __enter__(self) -> "Runner":
        if self.address is not None:
            ray = self._stack.enter_context(_ray(self.address))
            _fits_threads(ray, self.threads)
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
            detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
            raise NetshrinkError(f"a run on the Ray cluster failed: {type(cause).__name__}: {detail}") from None
