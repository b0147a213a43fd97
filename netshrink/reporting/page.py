"""One self-contained HTML page about a saved model: plots people would rather look at than read.

* **Bytes per layer**, read from the file itself: each layer's weight split into positions (the
  significance map) and values, its other tensors (bias, BatchNorm, codebooks), and the file's
  own overhead (header and manifest).
* With the search record ``netshrink auto`` writes beside its output: each layer's **sensitivity
  curves** (validation damage against coded bytes, one curve per bit width along the keep
  fractions, the chosen setting marked) and the **trials** the search ran against its budget.
* With a dense reference and data: **accuracy against bytes and against latency** (ONNX Runtime,
  batch 1) for this model and the peers made from the reference (``netshrink.benchmark``).

Plots are matplotlib PNGs embedded as base64, so the page is one file with no network access.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import NetshrinkError

MAX_RECORD = 1 << 26  # an auto search record is JSON of a few hundred KiB; a larger one is cut, then fails to parse

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#666;font-size:.9em}pre{background:#f7f7f7;padding:8px;font-size:.85em}"""
MAX_SENSITIVITY_PANELS = 24


def tensor_bytes(data: bytes, source: str = "file") -> tuple[list[dict], int]:
    """Every stored tensor of a file's bytes: ``{name, bytes, position_bytes}`` (the map's share of
    a coded float tensor, found by coding it again: the coder is deterministic, so the bytes are
    the file's), and the bytes that are not tensor payloads (header, manifest, checksum)."""
    from ..store.artifact import read_manifest
    from ..store.codec import weights as codec

    manifest, stored = read_manifest(data, source)
    rows = []
    for name, entry in manifest["tensors"].items():
        if "same_as" in entry:
            continue
        payload = stored[name]
        size = payload.nbytes
        positions = 0
        if entry.get("enc") == "weights":
            stats: dict = {}
            again = codec.encode(codec.decode(payload.tobytes(), tuple(entry["shape"])), stats)
            positions = stats["position_bits"] / 8 if len(again) == size else 0
        rows.append({"name": name, "bytes": size, "position_bytes": positions})
    return rows, len(data) - sum(r["bytes"] for r in rows)


def _figure_html(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bytes_section(rows: list[dict], overhead: int, total: int) -> str:
    import matplotlib.pyplot as plt

    layers: dict[str, dict[str, float]] = {}
    for r in rows:
        layer, _, attribute = r["name"].rpartition(".")
        slot = layers.setdefault(layer or r["name"], {"positions": 0.0, "values": 0.0, "other tensors": 0.0})
        if attribute == "weight":
            slot["positions"] += r["position_bytes"]
            slot["values"] += r["bytes"] - r["position_bytes"]
        else:
            slot["other tensors"] += r["bytes"]
    layers["file overhead"] = {"positions": 0.0, "values": 0.0, "other tensors": float(overhead)}
    names = list(layers)[::-1]
    figure, axis = plt.subplots(figsize=(9, 0.35 * len(names) + 1.2))
    left = np.zeros(len(names))
    for part, color in (("positions", "tab:orange"), ("values", "tab:blue"), ("other tensors", "tab:gray")):
        widths = np.array([layers[n][part] for n in names])
        axis.barh(names, widths, left=left, color=color, label=part)
        left += widths
    axis.set_xlabel("bytes in the file")
    axis.legend(loc="lower right")
    axis.grid(axis="x", alpha=0.3)
    table = _table(["layer", "positions", "values", "other tensors", "total", "share"],
                   [[n, f"{v['positions']:,.0f}", f"{v['values']:,.0f}", f"{v['other tensors']:,.0f}",
                     f"{sum(v.values()):,.0f}", f"{100 * sum(v.values()) / total:.1f}%"] for n, v in layers.items()])
    return "<h2>Bytes per layer</h2>" + _figure_html(figure) + table


def _sensitivity_section(search: dict) -> str:
    import matplotlib.pyplot as plt

    table = search.get("sensitivity") or {}
    layers = list(table)[:MAX_SENSITIVITY_PANELS]
    if not layers:
        return ""
    columns = min(3, len(layers))
    lines = -(-len(layers) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    chosen = search.get("policy", {})
    # A byte budget's choices (keep x shared bits) against their coded bytes; a latency budget's
    # (units kept) against the latency measured with only that group shrunk.
    latency = "latency" in next(iter(table.values()))[0]
    cost = (lambda c: 1e3 * c["latency"]) if latency else (lambda c: c["bytes"])
    for axis, layer in zip(axes.ravel(), layers):
        choices = table[layer]
        for bits in sorted({c.get("bits") for c in choices}, key=lambda b: 99 if b is None else b):
            curve = [(cost(c), c["damage"]) for c in choices if c.get("bits") == bits]
            curve = curve if latency else sorted(curve)  # latency: in order of units kept, as measured
            axis.plot(*zip(*curve), marker=".", label="units kept" if latency else
                      "fp32 values" if bits is None else f"{bits}-bit")
        if layer in chosen:
            axis.scatter([cost(chosen[layer])], [chosen[layer]["damage"]], s=120, facecolors="none",
                         edgecolors="red", zorder=5, label="chosen")
        if not latency:
            axis.set_xscale("log")
        axis.set_yscale("symlog", linthresh=1e-3)
        axis.set_ylim(bottom=0)
        axis.set_title(layer, fontsize=9)
        axis.set_xlabel("ONNX Runtime ms (this group alone shrunk)" if latency else "coded bytes", fontsize=8)
        axis.set_ylabel("validation loss increase", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in axes.ravel()[len(layers):]:
        axis.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    figure.tight_layout()
    note = (f'<p class="note">Each layer alone compressed, every other layer dense, before fine-tuning; '
            f'{len(table) - len(layers)} more layers not drawn.</p>' if len(table) > len(layers) else
            '<p class="note">Each layer alone compressed, every other layer dense, before fine-tuning.</p>')
    return "<h2>Sensitivity per layer</h2>" + _figure_html(figure) + note


def _trials_section(search: dict) -> str:
    import matplotlib.pyplot as plt

    trials = search.get("trials") or []
    if not trials:
        return ""
    figure, axis = plt.subplots(figsize=(7, 4))
    latency = "max_latency" in search["budget"]  # trials against their measured latency, not their bytes
    key, scale, label = ("latency", 1e3, "ONNX Runtime ms per batch") if latency else ("file_bytes", 1, "file bytes")
    sizes = [scale * t[key] for t in trials]
    accuracies = [100 * t["accuracy"] for t in trials if t.get("accuracy") is not None]
    if len(accuracies) == len(trials):
        axis.scatter(sizes, accuracies, c="tab:blue", zorder=3, label="trials (fine-tuned)")
        for t, size, accuracy in zip(trials, sizes, accuracies):
            axis.annotate(str(t["trial"]), (size, accuracy), xytext=(4, 3), textcoords="offset points", fontsize=8)
        if search.get("accuracy") is not None:
            axis.scatter([scale * search[key]], [100 * search["accuracy"]], s=160, facecolors="none",
                         edgecolors="red", zorder=4, label="chosen")
        if search.get("dense_accuracy") is not None:
            axis.axhline(100 * search["dense_accuracy"], color="black", lw=0.8, ls=":", label="dense")
            if "max_drop" in search["budget"]:
                axis.axhline(100 * search["dense_accuracy"] - search["budget"]["max_drop"], color="red", lw=0.8,
                             ls="--", label="budget")
            elif "max_error_rate" in search["budget"]:
                axis.axhline(100 - search["budget"]["max_error_rate"], color="red", lw=0.8, ls="--", label="budget")
        if "max_bytes" in search["budget"] or latency:
            axis.axvline(scale * search["budget"]["max_latency" if latency else "max_bytes"], color="red", lw=0.8,
                         ls="--", label="budget")
        axis.set_ylabel("validation accuracy (%)")
        axis.legend(fontsize=8)
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)
    rows = [[t["trial"], f"{t['file_bytes']:,}" + (f" ({1e3 * t['latency']:.3f} ms)" if latency else ""), "-" if t.get("accuracy") is None else f"{100 * t['accuracy']:.2f}%",
             "; ".join(f"{n}: {d}" for n, d in t["policy"].items())] for t in trials]
    return ("<h2>Search</h2>" + _figure_html(figure) +
            _table(["trial", "file bytes", "validation accuracy", "policy"], rows))


def _pareto_section(result, file_bytes: int) -> str:
    import matplotlib.pyplot as plt

    styles = {"dense": ("black", "D"), "peer": ("tab:gray", "o"), "netshrink": ("tab:blue", "s")}
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for number, r in enumerate(result.rows, 1):  # numbered as in the table below: names would overlap
        color, marker = styles[r.candidate.kind]
        for axis, x in ((axes[0], r.candidate.bytes), (axes[1], 1e3 * r.latency(False))):
            axis.scatter(x, r.score, c=color, marker=marker, s=40, zorder=3)
            axis.annotate(str(number), (x, r.score), fontsize=7, xytext=(3, 3), textcoords="offset points")
    best = max((r for r in result.rows if r.candidate.kind == "netshrink"), key=lambda r: r.score, default=None)
    if best is not None:
        axes[0].scatter(file_bytes, best.score, c="tab:red", marker="*", s=140, zorder=4)
        axes[0].annotate("netshrink file (.nsk)", (file_bytes, best.score), fontsize=7, xytext=(4, -10),
                         textcoords="offset points", color="tab:red")
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=k) for k, (c, m) in styles.items()]
    axes[1].legend(handles=handles, loc="lower right", fontsize=8)
    axes[0].set_xlabel("bytes on disk (log scale)")
    axes[1].set_xlabel("latency at batch 1, ONNX Runtime (ms, median; log scale)")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_ylabel(result.score_name)
        axis.grid(alpha=0.3)
    rows = [[number, r.candidate.name, r.candidate.kind, f"{r.candidate.bytes:,}", f"{r.score:.4g}",
             f"{1e3 * r.latency(False):.3f}", f"{1e3 * r.latency(True):.2f}"] for number, r in enumerate(result.rows, 1)]
    return ("<h2>Accuracy against bytes and latency, with the peers</h2>" + _figure_html(figure) +
            _table(["#", "candidate", "kind", "bytes", result.score_name, "batch 1 (ms)", f"{result.large_label} (ms)"],
                   rows) + "".join(f'<p class="note">{html.escape(w)}</p>' for w in result.warnings))


def report_page(path: str | os.PathLike, output: str | os.PathLike, *, search: str | os.PathLike | None = None,
                reference: "str | os.PathLike | nn.Module | None" = None, data=None, calibration=None, repeats: int = 50,
                progress=lambda step: None) -> Path:
    """Write one HTML page about the netshrink file at ``path`` to ``output`` (atomically); returns
    its path. ``search``: the JSON record ``netshrink auto`` wrote (default: ``FILE.auto.json``
    beside the file, if present). ``reference`` (a dense model, or its file) with ``data`` (labeled test
    data): add accuracy against bytes and latency with the peers (a ``netshrink.benchmark`` run).
    """
    try:
        import matplotlib
    except ImportError:
        raise NetshrinkError("the report draws with matplotlib: pip install 'netshrink[export]'") from None
    matplotlib.use("Agg")
    from ..store.artifact import from_bytes, load
    from ..files import atomic_write, check_writable, open_regular
    from ..compress.methods.base import baked_state_dict

    path = Path(path)
    output = check_writable(output, inputs=(path,))
    if (reference is None) != (data is None):
        raise NetshrinkError("the Pareto plots need both a dense reference model and data")
    with open_regular(path) as file:
        raw = file.read()
    model = from_bytes(raw, source=str(path))
    default = path.with_name(path.stem + ".auto.json")
    search_path = Path(search) if search is not None else (default if default.is_file() else None)
    record = None
    if search_path is not None:
        try:
            with open_regular(search_path, "search record") as file:
                record = json.loads(file.read(MAX_RECORD + 1)[:MAX_RECORD])
        except (OSError, ValueError, RecursionError) as exc:
            raise NetshrinkError(f"cannot read the search record {search_path}: {exc}") from None
        if not isinstance(record, dict):
            raise NetshrinkError(f"{search_path} is not a netshrink auto search record")
    rows, overhead = tensor_bytes(raw, str(path))
    # The plain weights' state (transform buffers left out), computed without decoding the file again.
    dense = 4 * sum(p.numel() for p in baked_state_dict(model).values() if p.is_floating_point())
    parts = [f"<h1>netshrink report: {html.escape(path.name)}</h1>",
             _table(["file bytes", "dense fp32 bytes", "smaller by", "tensors"],
                    [[f"{len(raw):,}", f"{dense:,}", f"{dense / len(raw):.1f}x", len(rows)]])]
    recipe = model.netshrink_manifest.get("recipe")
    if recipe:
        import yaml

        parts.append("<h2>Made by</h2><pre>" + html.escape(yaml.safe_dump({"steps": recipe}, sort_keys=False)) + "</pre>")
    parts.append(_bytes_section(rows, overhead, len(raw)))
    if record is not None:
        parts += [_sensitivity_section(record), _trials_section(record)]
    if reference is not None:
        from ..deploy.bench import benchmark

        reference_model = reference if isinstance(reference, nn.Module) else load(reference)
        result = benchmark(reference_model, data, compressed={path.stem: model}, calibration=calibration, repeats=repeats,
                           large_repeats=max(3, repeats // 10), progress=progress)
        parts.append(_pareto_section(result, len(raw)))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>netshrink report: {html.escape(path.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    atomic_write(output, page.encode())
    return output
