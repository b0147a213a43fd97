"""Latency, accuracy and size of compressed models against the peers, measured in one run.

Candidates:

* the reference model in PyTorch (fp32) and, as a user would otherwise deploy it, the peers:
  ONNX Runtime fp32, ONNX Runtime ``quantize_dynamic`` and ``quantize_static`` (QDQ, per channel,
  calibrated on the same data), ``torch.ao`` dynamic int8 (Linear) and static int8 (FX graph
  mode, x86 backend, for models torch.fx can trace), and torchao's int8 dynamic-activation
  int8-weight config (when torchao is installed);
* each netshrink model, exported to ONNX Runtime as int8 and as fp32. Weights of at most 7 bits
  are exact on every x86-64 CPU; 8-bit weights keep the full int8 range where this machine's int8
  kernels add exactly (VNNI or AMX, measured by :mod:`netshrink.deploy.machine`). A model whose weights
  are on 2-8-bit grids is also timed at its own width (``export(..., low_bit=True)``: MatMulNBits),
  on OpenVINO too where it is installed.

With OpenVINO installed (``pip install openvino nncf``), a second runtime joins: the dense model as
OpenVINO runs it and NNCF's int8 quantization of it for OpenVINO (peers: what a user gets from that
runtime and its own quantizer, with their defaults and the same calibration data) and each netshrink model's
standard-ONNX int8 graph (``export(..., portable=True)``) and fp32 graph on it. OpenVINO runs float
operations at its default precision for the CPU (bf16 where the CPU has AMX or AVX512-BF16), so
those rows are named with the precision and scored like every other.

The report names the machine: its CPU, int8 instruction sets and int8 kernel kind.

Every candidate is scored on the same data: classification accuracy when the data has labels,
else the mean cosine similarity of its (mask-)pooled outputs to the reference model's (sentence
embeddings for a transformer encoder). Latency is timed at batch 1 and at a large batch (256 for
images; 32 sequences of 128 tokens for token inputs) in interleaved rounds, every candidate in
turn, so that drift on a shared machine hits all alike; the spread between rounds is reported and
a warning is given where it is too wide to trust a difference. One thread count for every runtime.
The Pareto front (no other candidate both faster and at least as accurate) is marked per batch
size, and :meth:`BenchResult.plot` draws it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import itertools
import json
import logging
import math
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NetshrinkError
from .machine import describe, int8_sums_saturate
from ..compress.methods.activations import detach_all
from .codes import integer_layers
from ..compress.methods.base import LINEAR_CONV, bake

NOISY_SPREAD = 0.25  # round medians differing by more than this share of the median: warn
ACCURACY_TOLERANCE = 0.3  # points below the peer's accuracy that still count as "the same accuracy"
COSINE_FLOOR = 0.99  # for models scored by cosine to the reference: the bar is absolute
SPEED_BAR, DENSE_BAR = 1.5, 2.0  # faster than the fastest peer, faster than dense PyTorch


@dataclass
class Candidate:
    name: str
    kind: str  # "dense" (the reference in PyTorch), "peer", or "netshrink"
    run: Callable[[dict], np.ndarray]  # the output tensor for a feed (numpy arrays by input name)
    bytes: int
    onnx: Path | None = None  # the graph the runtime runs, for its operator profile
    runtime: str = "PyTorch"


@dataclass
class Timing:
    median: float  # seconds
    p90: float
    spread: float  # (slowest - fastest round median) / median


@dataclass
class Measured:
    candidate: Candidate
    small: Timing
    large: Timing
    score: float  # accuracy in % or mean cosine
    pareto: tuple[bool, bool] = (False, False)  # on the front at batch 1, at the large batch

    def latency(self, large: bool) -> float:
        """Median seconds at the large batch, or at batch 1."""
        return (self.large if large else self.small).median


@dataclass
class _Workload:
    small: dict[str, np.ndarray]
    large: dict[str, np.ndarray]
    large_label: str
    large_batch: int
    evaluation: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    calibration: list[dict[str, np.ndarray]]
    metric: str  # "accuracy" or "cosine"
    example: object  # one batch as the model takes it, for export and tracing


@dataclass
class BenchResult:
    rows: list[Measured]
    metric: str
    threads: int
    large_label: str
    large_batch: int
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    machine: str = ""  # netshrink.deploy.machine.describe() of the machine that measured

    @property
    def warnings(self) -> list[str]:
        noisy = [f"{r.candidate.name} ({label} {100 * timing.spread:.0f}%)" for r in self.rows
                 for label, timing in (("batch 1", r.small), ("large", r.large)) if timing.spread > NOISY_SPREAD]
        if not noisy:
            return []
        return [f"timings too noisy to trust: the medians of the interleaved rounds differ by more than "
                f"{100 * NOISY_SPREAD:.0f}% for {', '.join(noisy)}; differences smaller than the spread are noise "
                "(more repeats, or a quieter machine)"]

    @property
    def score_name(self) -> str:
        return "accuracy" if self.metric == "accuracy" else "cosine to fp32"

    def _score(self, value: float) -> str:
        return f"{value:.2f}%" if self.metric == "accuracy" else f"{value:.4f}"

    def columns(self) -> list[str]:
        return ["candidate", "batch 1 median (ms)", "b1 spread", f"{self.large_label} median (ms)", "spread",
                "items/s", "vs fastest peer b1", "vs fastest peer large", "file bytes", self.score_name, "Pareto"]

    def table(self) -> list[list]:
        peer_small, peer_large = (min(r.latency(large) for r in self.rows if r.candidate.kind == "peer")
                                  for large in (False, True))
        out = []
        for r in sorted(self.rows, key=lambda r: r.large.median):
            front = ", ".join(label for label, on in zip(("b1", "large"), r.pareto) if on)
            out.append([r.candidate.name, f"{1e3 * r.small.median:.3f}", f"{100 * r.small.spread:.0f}%",
                        f"{1e3 * r.large.median:.2f}", f"{100 * r.large.spread:.0f}%",
                        f"{self.large_batch / r.large.median:,.0f}", f"{peer_small / r.small.median:.2f}x",
                        f"{peer_large / r.large.median:.2f}x", f"{r.candidate.bytes:,}", self._score(r.score), front])
        return out

    def judged(self, large: bool) -> tuple[Measured, float, Measured | None]:
        """(the fastest peer, the accuracy floor it sets, netshrink's fastest model at or above that
        floor or None) at batch 1 or the large batch: what the bars compare."""
        pick = partial(Measured.latency, large=large)
        fastest = min((r for r in self.rows if r.candidate.kind == "peer"), key=pick)
        floor = (fastest.score - ACCURACY_TOLERANCE if self.metric == "accuracy" else COSINE_FLOOR)
        eligible = [r for r in self.rows if r.candidate.kind == "netshrink" and r.score >= floor - 1e-9]
        return fastest, floor, min(eligible, key=pick) if eligible else None

    def verdict(self) -> list[str]:
        """The bars, checked on this run: netshrink's fastest model at the peer's accuracy against
        the fastest peer (and, where that peer misses the accuracy bar, the fastest peer that
        meets it), and against dense PyTorch."""
        lines = []
        dense = next(r for r in self.rows if r.candidate.kind == "dense")
        peers = [r for r in self.rows if r.candidate.kind == "peer"]
        ours = [r for r in self.rows if r.candidate.kind == "netshrink"]
        for label, large in (("batch 1", False), (self.large_label, True)):
            pick = partial(Measured.latency, large=large)
            fastest, floor, best = self.judged(large)
            if best is None:
                best = max(ours, key=lambda r: r.score) if ours else None
                lines.append(f"- {label}: no netshrink model reaches {self._score(floor)} "
                             + (f"(best: {best.candidate.name}, {self._score(best.score)})" if best else "(none given)"))
                continue
            ratio, dense_ratio = pick(fastest) / pick(best), pick(dense) / pick(best)
            text = (f"- {label}: {best.candidate.name} ({1e3 * pick(best):.3f} ms, {self._score(best.score)}) is "
                    f"{ratio:.2f}x the speed of the fastest peer, {fastest.candidate.name} ({1e3 * pick(fastest):.3f} ms, "
                    f"{self._score(fastest.score)}): bar {SPEED_BAR}x {'met' if ratio >= SPEED_BAR else 'missed'}; "
                    f"{dense_ratio:.2f}x dense PyTorch: bar {DENSE_BAR}x {'met' if dense_ratio >= DENSE_BAR else 'missed'}")
            accurate = [r for r in peers if r.score >= floor - 1e-9]
            if fastest.score < floor and accurate:
                match = min(accurate, key=pick)
                text += (f"; against the fastest peer that also reaches {self._score(floor)}, {match.candidate.name} "
                         f"({1e3 * pick(match):.3f} ms): {pick(match) / pick(best):.2f}x")
            runtimes = sorted({r.candidate.runtime for r in peers})
            if len(runtimes) > 1:  # which runtime the speed comes from: the fastest peer of each, side by side
                each = [min((r for r in peers if r.candidate.runtime == rt), key=pick) for rt in runtimes]
                text += "; against each runtime's fastest peer: " + ", ".join(
                    f"{r.candidate.runtime} {pick(r) / pick(best):.2f}x ({r.candidate.name})" for r in each)
            lines.append(text + ".")
        return lines

    def markdown(self) -> str:
        from ..tables import markdown

        parts = [markdown(self.columns(), self.table()), "",
                 f"Machine: {self.machine}." if self.machine else "",
                 f"{self.threads} threads for every runtime. Rows sorted by {self.large_label} latency; Pareto: "
                 "no other candidate is both faster and at least as accurate at that batch size.", ""]
        parts += [f"- note: {n}" for n in self.notes] + [f"- **warning**: {w}" for w in self.warnings]
        parts += ["", "Bars:", *self.verdict()]
        runtime = {r.candidate.name: r.candidate.runtime for r in self.rows}
        for name, ops in self.profiles.items():
            parts += ["", f"Where the time goes, {name} ({self.large_label}, {runtime.get(name, 'ONNX Runtime')} "
                      "profile):", "",
                      markdown(["operator", "ms per run", "share"],
                               [[op, f"{ms:.2f}", f"{100 * share:.0f}%"] for op, ms, share in ops])]
        return "\n".join(parts)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Accuracy against latency, one panel per batch size, peers and netshrink apart, the Pareto
        front drawn as a step line; written atomically as PNG."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..files import atomic_write, check_writable

        path = check_writable(path)
        figure, axes = plt.subplots(1, 2, figsize=(12, 5))
        styles = {"dense": ("black", "D"), "peer": ("tab:gray", "o"), "netshrink": ("tab:blue", "s")}
        for axis, large, label in ((axes[0], False, "batch 1"), (axes[1], True, self.large_label)):
            points = [(1e3 * r.latency(large), r.score) for r in self.rows]
            for r, (latency, score), lift in zip(self.rows, points, _label_lifts(points)):
                color, marker = styles[r.candidate.kind]
                axis.scatter(latency, score, c=color, marker=marker, s=40, zorder=3)
                axis.annotate(r.candidate.name, (latency, score), fontsize=7, xytext=(4, 3 - lift),
                              textcoords="offset points", arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5}
                              if lift else None)
            front = sorted((1e3 * r.latency(large), r.score) for r in self.rows if r.pareto[large])
            if front:
                axis.step(*zip(*front), where="post", color="tab:blue", alpha=0.4, zorder=2)
            axis.set_xscale("log")
            axis.set_xlabel(f"latency at {label} (ms, median; log scale)")
            axis.set_ylabel(self.score_name)
            axis.grid(alpha=0.3)
        handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=k) for k, (c, m) in styles.items()]
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)  # below: covers no point
        figure.suptitle(title or f"{self.score_name} vs latency, {self.threads} threads")
        figure.tight_layout(rect=(0, 0.05, 1, 1))
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        atomic_write(path, buffer.getvalue())
        return path



def _label_lifts(points: list[tuple[float, float]], step: float = 9.0) -> list[float]:
    """How far (in points) to move each point's label down so that labels of points close together
    on a log-latency axis do not print over each other: each label goes below the ones already
    placed within a tenth of a decade and 3% of the score range of it."""
    scores = [s for _, s in points]
    span = (max(scores) - min(scores)) or 1.0
    placed: list[tuple[float, float, float]] = []
    lifts = []
    for latency, score in points:
        x = math.log10(max(latency, 1e-9))
        near = [lift for px, ps, lift in placed if abs(px - x) < 0.1 and abs(ps - score) < 0.03 * span]
        lift = 0.0 if not near else max(near) + step
        placed.append((x, score, lift))
        lifts.append(lift)
    return lifts


@contextlib.contextmanager
def _quiet_root_log(prefix: str):
    """Drop the root logger's records that start with ``prefix`` for the block: ONNX Runtime's
    quantizers advise, through ``logging.warning``, a pre-processing step the peer is measured without
    (its defaults, as a user calls it); the advice is not the user's to act on here."""
    def drop(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(prefix)

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)

def _interleaved(runs: list[Callable[[], object]], repeats: int, rounds: int = 10) -> list[Timing]:
    """Timing per run, measured in ``rounds`` alternating rounds so that drift on a shared machine
    (other load, frequency changes) hits every candidate alike."""
    for run in runs:  # warm-up: first calls allocate, compile kernels, fill caches
        for _ in range(max(3, repeats // 20)):
            run()
    samples: list[list[list[float]]] = [[] for _ in runs]
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            # ONNX Runtime's worker threads spin-wait for a while after each run (its default, kept:
            # it is what users get); a pause lets them go idle so they do not steal the cores from
            # the next candidate, and a few untimed runs re-warm this one.
            time.sleep(0.05)
            for _ in range(2):
                run()
            times = []
            for _ in range(per_round):
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
            samples[i].append(times)
    timings = []
    for rounds_of_one in samples:
        every = np.concatenate(rounds_of_one)
        medians = [float(np.median(r)) for r in rounds_of_one]
        median = float(np.median(every))
        timings.append(Timing(median, float(np.percentile(every, 90)), (max(medians) - min(medians)) / median))
    return timings


def ort_session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def operator_profile(path: Path, feed: dict, threads: int, runs: int = 10) -> list[tuple[str, float, float]]:
    """(operator type, ms per run, share of operator time) from ONNX Runtime's own profiler,
    largest first: where a graph spends its time."""
    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(path, threads, str(Path(folder) / "profile"))
        for _ in range(runs + 5):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]].append(event["dur"])
    # The first five runs warm up (allocation, thread start): their events are dropped.
    totals = {op: sum(d[len(d) * 5 // (runs + 5):]) / runs / 1e3 for op, d in per_op.items()}
    whole = sum(totals.values()) or 1.0
    return sorted(((op, ms, ms / whole) for op, ms in totals.items()), key=lambda t: -t[1])


def _workload(data, calibration, sequence: int, large_batch: int | None) -> _Workload:
    from ..training.batches import _in_memory, batches

    tensors = _in_memory(data)
    if tensors is not None:
        x, y = tensors
        if not x.is_floating_point():
            raise NetshrinkError("bench takes float inputs as a tensor data set; token inputs as a list of dict batches")
        size = large_batch or 256
        evaluation = [({"input": x[i:i + 500].numpy()}, None if y is None else y[i:i + 500].numpy())
                      for i in range(0, len(x), 500)]
        cal_x = _calibration_images(calibration, x)
        return _Workload({"input": x[:1].numpy()}, {"input": _repeat(x, size).numpy()}, f"batch {size}", size, evaluation,
                         [{"input": cal_x[i:i + 128]} for i in range(0, len(cal_x), 128)],
                         "accuracy" if y is not None else "cosine", x[:2])
    evaluation = []
    for inputs, labels in batches(data):
        if not isinstance(inputs, Mapping):
            raise NetshrinkError("bench takes token inputs as dict batches (input_ids, attention_mask, ...)")
        evaluation.append(({k: v.numpy() for k, v in inputs.items()}, None if labels is None else labels.numpy()))
    if not evaluation:
        raise NetshrinkError("the data is empty")
    # Timing inputs: ``sequence`` tokens drawn from the data's own (seeded), every position attended.
    ids = np.concatenate([feed["input_ids"].ravel() for feed, _ in evaluation])
    rng = np.random.default_rng(0)
    size = large_batch or 32

    def tokens(batch: int) -> dict[str, np.ndarray]:
        feed = {}
        for key, value in evaluation[0][0].items():
            if key == "input_ids":
                feed[key] = rng.choice(ids, (batch, sequence)).astype(value.dtype)
            elif key == "attention_mask":
                feed[key] = np.ones((batch, sequence), value.dtype)
            else:
                feed[key] = np.zeros((batch, sequence), value.dtype)
        return feed

    labelled = all(labels is not None for _, labels in evaluation)
    cal_feeds = [feed for feed, _ in evaluation[:8]]
    if calibration is not None:
        cal_feeds = [{k: v.numpy() for k, v in inputs.items()} for inputs, _ in itertools.islice(batches(calibration), 8)]
    return _Workload(tokens(1), tokens(size), f"batch {size} x {sequence} tokens", size, evaluation, cal_feeds,
                     "accuracy" if labelled else "cosine", {k: torch.from_numpy(v) for k, v in evaluation[0][0].items()})


def _calibration_images(calibration, x: torch.Tensor) -> np.ndarray:
    """Up to 1024 calibration inputs: from ``calibration`` (in memory or any iterable of batches),
    else from the data being scored (the user's choice when they give no calibration data)."""
    from ..training.batches import batches

    if calibration is None:
        return x[:1024].numpy()
    taken, count = [], 0
    for inputs, _ in batches(calibration, 256):
        if not torch.is_tensor(inputs) or not inputs.is_floating_point():
            raise NetshrinkError("calibration for an image model must hold float image tensors")
        taken.append(inputs[:1024 - count])
        count += len(taken[-1])
        if count >= 1024:
            break
    if not taken:
        raise NetshrinkError("the calibration data is empty")
    return torch.cat(taken).numpy()


def _repeat(x: torch.Tensor, size: int) -> torch.Tensor:
    return x[torch.arange(size) % len(x)]


def _score(outputs: list[np.ndarray], work: _Workload, reference: list[np.ndarray] | None) -> float:
    if work.metric == "accuracy":
        hits = sum(int((o.argmax(-1) == labels).sum()) for o, (_, labels) in zip(outputs, work.evaluation))
        return 100.0 * hits / sum(len(labels) for _, labels in work.evaluation)
    cosines = [(_pooled(o, feed) * _pooled(r, feed)).sum(-1) for o, r, (feed, _) in zip(outputs, reference, work.evaluation)]
    return float(np.concatenate(cosines).mean())


def _pooled(output: np.ndarray, feed: dict) -> np.ndarray:
    """One unit vector per example: the mask-weighted mean over tokens (what sentence-transformers'
    mean pooling does), or the flattened output."""
    output = output.astype(np.float64)
    mask = feed.get("attention_mask")
    if output.ndim == 3 and mask is not None:
        output = (output * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    output = output.reshape(len(output), -1)
    return output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)


def _model_inputs(feed: dict[str, np.ndarray]):
    """A feed as the PyTorch model takes it: the image tensor itself, or a dict of token tensors."""
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    return inputs["input"] if list(inputs) == ["input"] else inputs


def _torch_candidate(name: str, kind: str, module: nn.Module, folder: Path) -> Candidate:
    from ..training.batches import call, output_tensor

    path = folder / f"{name.replace(' ', '_').replace('/', '_')}.pt"
    torch.save(module.state_dict(), path)  # our own file, just written: the size of what ships

    def outputs(feed: dict) -> np.ndarray:
        with torch.no_grad():
            return output_tensor(call(module, _model_inputs(feed))).numpy()

    return Candidate(name, kind, outputs, path.stat().st_size)


def _ort_candidate(name: str, kind: str, path: Path, threads: int) -> Candidate:
    session = ort_session(path, threads)
    wanted = {i.name for i in session.get_inputs()}

    def outputs(feed: dict) -> np.ndarray:
        return session.run(None, {k: v for k, v in feed.items() if k in wanted})[0]

    return Candidate(name, kind, outputs, path.stat().st_size, path, "ONNX Runtime")


def _openvino_candidate(name: str, kind: str, path: Path, threads: int) -> Candidate:
    """``path`` (ONNX, or OpenVINO's own .xml beside its .bin) compiled by OpenVINO for this CPU;
    ``{precision}`` in the name becomes the precision OpenVINO chose for float operations (its
    default for the CPU, as a user would get it)."""
    compiled, request, wanted = _openvino_request(path, threads)

    def outputs(feed: dict) -> np.ndarray:
        return request.infer({k: v for k, v in feed.items() if k in wanted}, share_outputs=False)[0]

    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    size = sum(f.stat().st_size for f in ([path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]))
    return Candidate(name.replace("{precision}", precision), kind, outputs, size, path, "OpenVINO")


def _openvino_request(path: Path, threads: int, profile: bool = False):
    """(the graph compiled for this CPU with ``threads`` threads and one stream, an inference
    request on it, the names of its inputs)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                          "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": profile})
    return compiled, compiled.create_infer_request(), {n for port in compiled.inputs for n in port.get_names()}


def openvino_profile(path: Path, feed: dict, threads: int, runs: int = 10) -> list[tuple[str, float, float]]:
    """(layer type as OpenVINO executes it, ms per run, share of layer time) from OpenVINO's own
    performance counters, largest first: :func:`operator_profile` for OpenVINO."""
    _, request, wanted = _openvino_request(path, threads, profile=True)
    feed = {k: v for k, v in feed.items() if k in wanted}
    for _ in range(5):  # warm-up, as for ONNX Runtime's profile
        request.infer(feed)
    totals: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer(feed)
        for layer in request.get_profiling_info():  # the counters of the last inference
            totals[f"{layer.node_type} ({layer.exec_type})"] += layer.real_time.total_seconds() * 1e3 / runs
    whole = sum(totals.values()) or 1.0
    return sorted(((op, ms, ms / whole) for op, ms in totals.items() if ms > 0), key=lambda t: -t[1])


RUNTIMES = ("onnxruntime", "openvino")


def _runtimes(runtimes) -> tuple[str, ...]:
    """The runtimes to measure: ONNX Runtime always; OpenVINO when asked for, or by default when installed."""
    installed = importlib.util.find_spec("openvino") is not None
    if runtimes is None:
        return RUNTIMES if installed else RUNTIMES[:1]
    chosen = (runtimes,) if isinstance(runtimes, str) else tuple(runtimes) if isinstance(runtimes, (list, tuple)) else None
    if not chosen or any(r not in RUNTIMES for r in chosen):
        raise NetshrinkError(f"runtimes must name some of {', '.join(RUNTIMES)}. Received: runtimes={runtimes!r}")
    if "onnxruntime" not in chosen:
        raise NetshrinkError("runtimes must include onnxruntime: the peers are made with it")
    if "openvino" in chosen and not installed:
        raise NetshrinkError("runtimes names openvino, which is not installed: pip install openvino")
    return tuple(r for r in RUNTIMES if r in chosen)


class _Reader:
    """ONNX Runtime calibration data reader over prepared feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _peers(dense: nn.Module, work: _Workload, fp32: Path, folder: Path, threads: int,
           notes: list[str], progress, runtimes: tuple[str, ...]) -> list[Candidate]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    peers = [_ort_candidate("ONNX Runtime fp32", "peer", fp32, threads)]
    if "openvino" in runtimes:
        try:
            peers.append(_openvino_candidate("OpenVINO dense ({precision})", "peer", fp32, threads))
        except RuntimeError as exc:  # a graph OpenVINO cannot compile: no OpenVINO rows, the run goes on
            notes.append(f"OpenVINO left out: it cannot compile the dense model: {str(exc).splitlines()[0][:120]}")
        else:
            peers += _nncf_peer(work, fp32, folder, threads, notes, progress)
    with warnings.catch_warnings(), _quiet_root_log("Please consider"):
        warnings.simplefilter("ignore")
        progress("peers: ONNX Runtime quantize_dynamic and quantize_static")
        quantize_dynamic(str(fp32), str(folder / "ort_dynamic.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        peers.append(_ort_candidate("ONNX Runtime quantize_dynamic", "peer", folder / "ort_dynamic.onnx", threads))
        quantize_static(str(fp32), str(folder / "ort_static.onnx"), _Reader(work.calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        peers.append(_ort_candidate("ONNX Runtime quantize_static", "peer", folder / "ort_static.onnx", threads))
        progress("peers: torch.ao and torchao")
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8)
        peers.append(_torch_candidate("torch.ao dynamic int8 (Linear)", "peer", dynamic, folder))
        if work.metric == "accuracy" and "input" in work.small:
            try:
                from torch.ao.quantization import get_default_qconfig_mapping
                from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

                prepared = prepare_fx(copy.deepcopy(dense), get_default_qconfig_mapping("x86"), (work.example,))
                with torch.no_grad():
                    for feed in work.calibration:
                        prepared(_model_inputs(feed))
                peers.append(_torch_candidate("torch.ao static int8 (FX, x86)", "peer", convert_fx(prepared), folder))
            except Exception as exc:  # FX tracing fails on data-dependent control flow
                notes.append(f"torch.ao static int8 left out: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            model = copy.deepcopy(dense)
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            peers.append(_torch_candidate("torchao int8 dynamic activations + int8 weights", "peer", model, folder))
        except ImportError:
            notes.append("torchao is not installed: its row is missing")
        except Exception as exc:
            notes.append(f"torchao left out: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    return peers


def _nncf_peer(work: _Workload, fp32: Path, folder: Path, threads: int, notes: list[str], progress) -> list[Candidate]:
    """OpenVINO's own int8 path: NNCF's post-training quantization of the dense model, with its
    defaults and the same calibration data, saved as OpenVINO's .xml/.bin and run by OpenVINO."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        notes.append("nncf is not installed: the row of OpenVINO's own int8 quantization is missing")
        return []
    progress("peers: NNCF int8 for OpenVINO")
    try:
        model = ov.Core().read_model(str(fp32))
        names = {name for port in model.inputs for name in port.get_names()}
        # One example per item, as NNCF's documentation calibrates; every example counts.
        examples = [{k: v[i:i + 1] for k, v in feed.items() if k in names}
                    for feed in work.calibration for i in range(len(next(iter(feed.values()))))]
        kind = nncf.ModelType.TRANSFORMER if work.metric == "cosine" else None
        quantized = nncf.quantize(model, nncf.Dataset(examples), model_type=kind, subset_size=len(examples))
        path = folder / "nncf_int8.xml"
        ov.save_model(quantized, str(path))
    except Exception as exc:  # a graph NNCF cannot take: the run goes on without its row
        notes.append(f"NNCF int8 left out: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return []
    return [_openvino_candidate("NNCF int8 (OpenVINO, rest {precision})", "peer", path, threads)]


def mark_pareto(rows: list[Measured]) -> None:
    """Set each row's ``pareto`` flags: at batch 1 and at the large batch, is no other row both at
    least as fast and at least as accurate, and better in one of the two?"""
    for r in rows:
        flags = []
        for large in (False, True):
            mine = r.latency(large)
            flags.append(not any(o.latency(large) <= mine and o.score >= r.score
                                 and (o.latency(large) < mine or o.score > r.score) for o in rows if o is not r))
        r.pareto = (flags[0], flags[1])


def _frozen(model: nn.Module) -> nn.Module:
    dense = bake(copy.deepcopy(model)).eval()
    detach_all(dense)
    return dense


def benchmark(reference: nn.Module, data, *, compressed: Mapping[str, nn.Module] | None = None,
              calibration=None, threads: int = 2, repeats: int = 200, large_repeats: int = 30,
              large_batch: int | None = None, sequence: int = 128, profile: bool = False, vnni: bool | None = None,
              runtimes=None, workdir: str | Path | None = None, progress: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Measure ``reference`` (the dense model: PyTorch fp32 and every peer are made from it) and
    each model in ``compressed`` (name -> netshrink model; by default the reference itself) on
    ``data``: an image data set (accuracy with labels) or a list of token dict batches (cosine
    to the reference when unlabeled). ``calibration`` feeds the static quantizers (default: the
    data). ``profile=True`` adds the runtime's own per-operator profile of the netshrink and peer
    graphs the large-batch bar compares. netshrink's int8 graphs keep 8-bit weights at the full int8
    range where this machine's int8 kernels add exactly (``vnni=None``: measured, see
    :mod:`netshrink.deploy.machine`), else at 7 bits; ``vnni=True``/``False`` decides it instead.
    ``runtimes`` names the runtimes to measure (``"onnxruntime"``, ``"openvino"``; default: every
    one installed). ``workdir`` keeps every exported graph (default: a temporary folder, removed
    when the measurement ends).

    >>> import netshrink
    >>> data = netshrink.load_dataset("digits", "test")
    >>> model = netshrink.build_model("mlp", in_shape=(1, 8, 8))
    >>> result = netshrink.benchmark(model, data, repeats=10, large_repeats=10)  # doctest: +SKIP
    >>> print(result.markdown())  # doctest: +SKIP
    """
    from .to_onnx import export

    try:
        importlib.import_module("onnxruntime.quantization")  # the peers need it: fail before any work
    except ImportError:
        raise NetshrinkError("bench needs onnxruntime: pip install 'netshrink[export]'") from None
    for what, value in (("threads", threads), ("repeats", repeats), ("large_repeats", large_repeats),
                        ("sequence", sequence)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise NetshrinkError(f"{what} must be a positive integer. Received: {what}={value!r}")
    if vnni is not None and not isinstance(vnni, bool):
        raise NetshrinkError(f"vnni must be True, False or None (measured on this machine). Received: vnni={vnni!r}")
    if large_batch is not None and (not isinstance(large_batch, int) or isinstance(large_batch, bool) or large_batch < 2):
        raise NetshrinkError(f"large_batch must be an integer >= 2. Received: large_batch={large_batch!r}")
    runtimes = _runtimes(runtimes)
    models = dict(compressed) if compressed is not None else {"": reference}
    if not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise NetshrinkError("compressed must map names to models")
    work = _workload(data, calibration, sequence, large_batch)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full_range = not int8_sums_saturate() if vnni is None else vnni
        # The exported graphs are written under ``workdir`` and kept there; by default under a
        # temporary folder removed afterwards (a transformer's fp32 graphs alone can be 90 MB each).
        with (contextlib.nullcontext(workdir) if workdir is not None
              else tempfile.TemporaryDirectory(prefix="netshrink-bench-")) as folder:
            return _measure(reference, models, work, threads, repeats, large_repeats, profile, folder, progress,
                            export, full_range, runtimes)
    finally:
        torch.set_num_threads(threads_before)


def _measure(reference, models, work, threads, repeats, large_repeats, profile, workdir, progress, export, full_range,
             runtimes):
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    dense = _frozen(reference)
    progress("exporting the reference to ONNX")
    fp32 = folder / "fp32.onnx"
    export(dense, fp32, example_inputs=work.example)
    candidates = [_torch_candidate("PyTorch fp32", "dense", dense, folder)]
    candidates += _peers(dense, work, fp32, folder, threads, notes, progress, runtimes)
    if not any(c.runtime == "OpenVINO" for c in candidates):  # not asked for, or it cannot run the dense model
        runtimes = tuple(r for r in runtimes if r != "openvino")
    calibration = [_model_inputs(feed) for feed in work.calibration]
    wide = False  # does any netshrink int8 graph hold 8-bit weights at the full int8 range?
    for i, (name, model) in enumerate(models.items()):
        label = f"netshrink{' ' + name if name else ''}"  # e.g. "netshrink keep 0.5 (ONNX Runtime int8)"
        progress(f"exporting {label}")
        int8_path, fp32_path = folder / f"netshrink_{i}_int8.onnx", folder / f"netshrink_{i}_fp32.onnx"
        report = export(model, int8_path, int8=True, calibration=calibration, example_inputs=work.example,
                        vnni=full_range)
        export(_frozen(model), fp32_path, example_inputs=work.example)
        candidates += [_ort_candidate(f"{label} (ONNX Runtime int8)", "netshrink", int8_path, threads),
                       _ort_candidate(f"{label} (ONNX Runtime fp32)", "netshrink", fp32_path, threads)]
        notes += [f"{label} int8 export: {n}" for n in report.notes]
        wide = wide or bool(report.full_range)
        if integer_layers(model, (*LINEAR_CONV, nn.Embedding)):  # weights on 2-8-bit grids: also at their own width
            low_bit = folder / f"netshrink_{i}_low_bit.onnx"
            export(model, low_bit, example_inputs=work.example, low_bit=True)
            candidates.append(_ort_candidate(f"{label} (ONNX Runtime low-bit)", "netshrink", low_bit, threads))
            if "openvino" in runtimes:  # OpenVINO reads MatMulNBits into its own u4/u8 weights
                candidates.append(_openvino_candidate(f"{label} (OpenVINO low-bit, rest {{precision}})", "netshrink",
                                                      low_bit, threads))
        if "openvino" in runtimes:  # OpenVINO reads standard ONNX only: the QDQ form of the same int8 model
            portable = folder / f"netshrink_{i}_int8_portable.onnx"
            export(model, portable, int8=True, calibration=calibration, example_inputs=work.example,
                   vnni=full_range, portable=True)
            try:
                candidates += [_openvino_candidate(f"{label} (OpenVINO int8, rest {{precision}})", "netshrink",
                                                   portable, threads),
                               _openvino_candidate(f"{label} (OpenVINO {{precision}})", "netshrink", fp32_path, threads)]
            except RuntimeError as exc:  # a graph OpenVINO cannot compile: the run goes on without its rows
                notes.append(f"{label} left out on OpenVINO: {str(exc).splitlines()[0][:120]}")
    # Said of the graphs as exported: a machine that adds exactly only matters to 8-bit weights.
    notes.insert(0, "netshrink's int8 graphs: " + ("8-bit weights keep the full int8 range (this machine's int8 "
                                                   "kernels add exactly)" if wide else "weights of at most 7 bits, "
                                                   "exact on every x86-64 CPU"))
    progress(f"timing {len(candidates)} candidates at batch 1 and {work.large_label}, in interleaved rounds")
    small = _interleaved([lambda c=c: c.run(work.small) for c in candidates], repeats)
    large = _interleaved([lambda c=c: c.run(work.large) for c in candidates], large_repeats)
    progress("scoring every candidate on the same data")
    reference_outputs = [candidates[0].run(feed) for feed, _ in work.evaluation]
    rows = []
    for candidate, s, lg in zip(candidates, small, large):
        outputs = reference_outputs if candidate is candidates[0] else [candidate.run(f) for f, _ in work.evaluation]
        rows.append(Measured(candidate, s, lg, _score(outputs, work, reference_outputs)))
    mark_pareto(rows)
    result = BenchResult(rows, work.metric, threads, work.large_label, work.large_batch, notes, machine=describe())
    if profile:  # the models the large-batch bar compares: netshrink's judged one (else its fastest), the fastest peer
        peer, _, judged = result.judged(True)
        for kind, chosen in (("netshrink", judged), ("peer", peer)):
            timed = [r for r in rows if r.candidate.kind == kind and r.candidate.onnx is not None]
            if chosen is None or chosen.candidate.onnx is None:  # none judged, or a PyTorch model: no graph
                chosen = min(timed, key=lambda r: r.latency(True)) if timed else None
            if chosen is not None:
                profiler = openvino_profile if chosen.candidate.runtime == "OpenVINO" else operator_profile
                result.profiles[chosen.candidate.name] = profiler(chosen.candidate.onnx, work.large, threads)
    return result


def random_tokens(model, count: int = 256, length: int = 64) -> list[dict]:
    """Seeded random token sequences of varied length, for scoring a transformer without text:
    the cosine to the reference measures how faithfully each candidate computes the same function."""
    vocabulary = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, count, 32):
        ids = torch.randint(min(1000, vocabulary - 1), vocabulary, (32, length), generator=generator)
        lengths = torch.randint(length // 4, length + 1, (32, 1), generator=generator)
        mask = (torch.arange(length)[None] < lengths).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches
