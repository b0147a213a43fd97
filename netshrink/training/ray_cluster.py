"""A Ray cluster, reached two ways: ``auto``'s trials as Ray tasks (``search.sweep``), and one job in
several processes of a ``torch.distributed`` group through Ray Train (:func:`run_processes`), which is
what ``torchrun`` does on machines a user starts by hand.

Ray Train, not a launcher of netshrink's own: its ``TorchTrainer`` places the processes on the
cluster's nodes, sets up the process group (gloo on CPUs, NCCL on GPUs) and stops every process
when one fails. netshrink's data parallelism (``training.distributed``) then runs unchanged inside
it: each process takes its share of every batch, the first one writes files and reports. Ray
carries the job's function and arguments with its own serialization between processes of the
user's own cluster; no file from elsewhere is unpickled.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import NetshrinkError, first_line

CONNECT_SECONDS = 3  # a cluster's head answers a TCP connection at once; nothing listening fails here


def import_ray(address: str, extra: str = ""):
    """Ray (and ``ray.<extra>``, e.g. ``train``), or one line saying what to install."""
    try:
        import ray
        if extra:
            __import__(f"ray.{extra}")
    except ImportError:
        wanted = f"ray[{extra}]" if extra else "ray"
        raise NetshrinkError(f"address={address!r} runs on Ray, which is not installed: pip install '{wanted}>=2.9' "
                             "(or netshrink[distributed])") from None
    return ray


def _head(address: str) -> tuple[str, int] | None:
    """(host, port) of a head node's address written ``host:port`` (its GCS port, 6379 by default)."""
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if host and "://" not in address and port.isdigit() else None


@contextlib.contextmanager
def connect(address: str, log_to_driver: bool = False) -> Iterator[object]:
    """Ray connected to the cluster at ``address`` (``"local"``: one started in this process), and
    disconnected afterwards if this call connected it."""
    ray = import_ray(address)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=log_to_driver, configure_logging=False)
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


def check_address_value(address) -> None:
    if not isinstance(address, str) or not address.strip():
        raise NetshrinkError(f"address must be a Ray cluster address such as 'auto', 'local', 'host:6379' or "
                             f"'ray://host:10001'. Received: address={address!r}")


def check_address(address: str | None, threads: int | None = None) -> float | None:
    """Before any long work: refuse an address that is not one, one Ray is not installed to reach,
    one where nothing answers (in seconds, not after Ray's minute of retries), or a cluster with no
    node that can run a task of ``threads`` CPUs. Returns the cluster's CPUs (None without an
    address; for ``"local"``, this machine's, the cluster being started when the work is)."""
    if address is None:
        return None
    _check_reachable(address)
    if address == "local":
        return float(os.cpu_count() or 1)
    with connect(address) as ray:
        return fits_threads(ray, threads or torch.get_num_threads())


def _check_reachable(address, extra: str = "") -> None:
    """An address that is one, Ray (and ``ray.<extra>``) installed, and a head that answers when the
    address names one: checked in seconds, before Ray's minute of retries."""
    check_address_value(address)
    import_ray(address, extra)
    head = _head(address)
    if head is not None:
        try:
            socket.create_connection(head, timeout=CONNECT_SECONDS).close()
        except OSError as exc:
            raise NetshrinkError(f"nothing answers at {address} ({exc.strerror or exc}): start the cluster there "
                                 "(`ray start --head --port PORT`) or give its address ('auto' on one of its "
                                 "machines, host:port of its head, or ray://host:10001)") from None


def _node_cpus(ray) -> list[float]:
    return [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]


def fits_threads(ray, threads: int) -> float:
    """The cluster's CPUs, once it is known that some node runs a task of ``threads`` CPUs."""
    widest = max(_node_cpus(ray), default=0)
    if widest < threads:  # such a task would wait for ever
        raise NetshrinkError(f"every run uses {threads} PyTorch threads (as in this process), but no "
                             f"node of the Ray cluster has {threads} CPUs (largest: {widest:g}): set "
                             f"torch.set_num_threads({int(widest) or 1}) first")
    return float(ray.cluster_resources().get("CPU", 0))


def _placement(ray, workers: int | None) -> tuple[int, int]:
    """How many processes, and how many CPUs (PyTorch threads) each: by default one process per node,
    as wide as the narrowest node; ``workers`` processes share the cluster's CPUs evenly, none wider
    than the narrowest node (Ray places each process whole on one node)."""
    cpus = _node_cpus(ray)
    if not cpus or min(cpus) < 1:
        raise NetshrinkError("the Ray cluster has a node without CPUs: start every node with --num-cpus 1 or more")
    if workers is None:
        return len(cpus), int(min(cpus))
    threads = min(int(min(cpus)), int(sum(cpus) // workers))
    if threads < 1:
        raise NetshrinkError(f"workers={workers} processes need a CPU each, but the Ray cluster has {sum(cpus):g}")
    return workers, threads


class _ToQueue(io.TextIOBase):
    """A text stream whose writes go to a Ray queue: the first process's output, shown by the caller."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self.queue.put(text)
        return len(text)


def _process(config: dict) -> None:
    """One process of the job, on a Ray Train worker: in the caller's folder, with its share of CPUs;
    the first process's output goes to the caller, the others' nowhere (they report nothing)."""
    import ray.train

    torch.set_num_threads(config["threads"])
    first = ray.train.get_context().get_world_rank() == 0
    stream = _ToQueue(config["output"]) if first else open(os.devnull, "w")
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            os.chdir(config["folder"])
        except OSError:
            raise NetshrinkError(f"the folder {config['folder']} is not on every node of the Ray cluster: run from "
                                 "a folder every node shares, as the model and data files must be") from None
        result = config["function"](*config["arguments"])
    ray.train.report({"result": result})


def run_processes(function: Callable, *arguments, address: str, workers: int | None = None):
    """``function(*arguments)`` in ``workers`` processes of one ``torch.distributed`` group on the Ray
    cluster at ``address`` (``"auto"``, ``"host:port"``, ``"ray://host:10001"``, or ``"local"`` for one
    started here), through Ray Train; by default one process per node, each with the narrowest node's
    CPUs as PyTorch threads. Every process starts in this process's folder (which, like the files it
    reads and writes, must be reachable from every node); what the first process prints is printed
    here as it comes. Returns the first process's result. A process that fails stops the others; its
    error is raised here as one line, naming it."""
    check_address_value(address)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise NetshrinkError(f"workers must be a whole number of processes, 1 or more. Received: workers={workers!r}")
    _check_reachable(address, extra="train")
    with connect(address) as ray:  # once: _placement checks the cluster's CPUs
        from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Empty, Queue

        count, threads = _placement(ray, workers)
        output = Queue()
        config = {"function": function, "arguments": arguments, "threads": threads, "folder": os.getcwd(),
                  "output": output}
        with tempfile.TemporaryDirectory(prefix="netshrink-ray-") as storage:
            trainer = TorchTrainer(
                _process, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=count, use_gpu=torch.cuda.is_available(),
                                             resources_per_worker={"CPU": threads}),
                run_config=RunConfig(storage_path=storage, failure_config=FailureConfig(max_failures=0)))
            outcome: dict = {}
            job = threading.Thread(target=_fit, args=(trainer, outcome, TrainingFailedError), daemon=True)
            job.start()
            while job.is_alive() or not output.empty():
                try:
                    sys.stdout.write(output.get(timeout=0.2))
                    sys.stdout.flush()
                except Empty:
                    pass
            job.join()
        output.shutdown()
    if "error" in outcome:
        raise NetshrinkError(_failure(outcome["error"]))
    return (outcome["result"].metrics or {}).get("result")


def _fit(trainer, outcome: dict, failed: type) -> None:
    try:
        outcome["result"] = trainer.fit()
    except failed as exc:
        outcome["error"] = exc


def _failure(exc: Exception) -> str:
    """One line for a failed Ray Train job: the first failed process's own error."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return f"the job on the Ray cluster failed: {first_line(exc, None)}"
    rank = min(failures)
    cause = failures[rank]
    return f"process {rank}: {cause}" if isinstance(cause, NetshrinkError) else failed_on_cluster(f"process {rank}", cause)


def failed_on_cluster(who: str, cause: BaseException | None) -> str:
    """One line for an error other than netshrink's raised on the cluster: its type and first line."""
    text = str(cause).strip() if cause is not None else ""
    detail = text.splitlines()[0] if text else ""
    return f"{who} on the Ray cluster failed: {type(cause).__name__}: {detail}"

