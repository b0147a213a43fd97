"""A GPT-2-class decoder (124M parameters, random weights from transformers' GPT2Config) generating
128 new tokens at batch 1, in ONNX Runtime and llama.cpp, with netshrink's weights and the peers'.

Speed does not depend on what the weights are, so they are random; netshrink quantizes them by
rounding to nearest (4 bits or 8 bits, groups of 32). ONNX Runtime: netshrink's graphs with the
key/value cache (``export(..., cache=True)``): fp32, and 4-bit (MatMulNBits + GatherBlockQuantized,
``low_bit=True``), and ONNX Runtime's own ``MatMulNBitsQuantizer`` 4-bit graph made from the fp32
one; for reference, the int8 (W8A8 static QDQ) graph without a cache, which recomputes the whole
sequence for every token. llama.cpp: netshrink's GGUF files (F16 floats, Q8_0 and Q4_0 blocks from
its 8-bit and 4-bit codes) and llama.cpp's own ``llama_model_quantize`` Q4_0 and Q8_0 from
netshrink's F16 file. Greedy decoding from a 16-token prompt; the median of ``--repeats`` runs,
candidates of a runtime interleaved; 2 threads.

Run from the repository root: ``python benchmarks/decoder_deploy.py`` (about 20 minutes).
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

FOLDER = Path(tempfile.mkdtemp(prefix="netshrink-decoder-"))
NEW_TOKENS = 128


def constant_weights(source: Path, target: Path) -> None:
    """The graph with every ``Transpose`` of a weight folded into a transposed weight: the dynamo
    exporter writes a Linear layer as MatMul(x, Transpose(W)), and ONNX Runtime's quantizer only
    quantizes a MatMul whose weight is a constant."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    weights = {i.name: i for i in model.graph.initializer}
    folded = {}
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and node.input[0] in weights:
            array = numpy_helper.to_array(weights[node.input[0]])
            if array.ndim == 2:
                model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), node.output[0]))
                folded[node.output[0]] = node
    for node in folded.values():
        model.graph.node.remove(node)
    onnx.save(model, str(target))


def ort_generate(path: Path):
    """Greedy generation: with the cache graph, the prompt once and then one token per step."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    inputs = {i.name: i.shape for i in session.get_inputs()}

    def generate(prompt: list[int]) -> list[int]:
        if "past_keys" not in inputs:  # no cache: the whole sequence every step
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                logits = session.run(None, {"input_ids": np.array([ids], np.int64)})[0]
                ids.append(int(logits[0, -1].argmax()))
            return ids[len(prompt):]
        layers, _, heads, _, size = inputs["past_keys"]
        keys = values = np.zeros((layers, 1, heads, 0, size), np.float32)
        feed, out = np.array([prompt], np.int64), []
        for _ in range(NEW_TOKENS):
            logits, keys, values = session.run(None, {"input_ids": feed, "past_keys": keys, "past_values": values})
            out.append(int(logits[0, -1].argmax()))
            feed = np.array([[out[-1]]], np.int64)
        return out
    return generate


def llama_generate(path: Path):
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)

    def generate(prompt: list[int]) -> list[int]:
        model.reset()
        model.eval(prompt)
        out = []
        for _ in range(NEW_TOKENS):
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
            out.append(token)
            model.eval([token])
        return out
    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per candidate")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    import llama_cpp
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config()).eval()
    parameters = sum(p.numel() for p in dense.parameters())
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50000, 16).tolist()
    example = {"input_ids": torch.tensor([prompt])}
    calibration = [{"input_ids": torch.from_numpy(rng.integers(0, 50000, (4, 64)))} for _ in range(4)]
    w4, w8 = copy.deepcopy(dense), copy.deepcopy(dense)
    netshrink.quantize(w4, 4, method="round", group_size=32)
    netshrink.quantize(w8, 8, method="round", group_size=32)
    files: dict[str, tuple[str, Path]] = {}

    def onnx(name, model, file, **options):
        netshrink.export(model, FOLDER / file, **({} if options.get("cache") else {"example_inputs": example}), **options)
        files[name] = ("ONNX Runtime", FOLDER / file)

    onnx("fp32 (cache)", dense, "fp32.onnx", cache=True)
    onnx("netshrink 4-bit g32 (MatMulNBits, cache)", w4, "w4.onnx", low_bit=True, cache=True)
    onnx("netshrink int8 (W8A8 static, no cache)", dense, "int8.onnx", int8=True, calibration=calibration)
    level = 4  # netshrink.export's default
    constant_weights(FOLDER / "fp32.onnx", FOLDER / "fp32_folded.onnx")
    peer = MatMulNBitsQuantizer(str(FOLDER / "fp32_folded.onnx"), bits=4, block_size=32, is_symmetric=True, accuracy_level=level,
                                op_types_to_quantize=("MatMul", "Gather"))
    peer.process()
    peer.model.save_model_to_file(str(FOLDER / "ort4.onnx"), use_external_data_format=False)
    files["peer: ORT MatMulNBitsQuantizer 4-bit g32 (cache)"] = ("ONNX Runtime", FOLDER / "ort4.onnx")
    netshrink.export(dense, FOLDER / "f16.gguf", float_type="F16")
    files["netshrink F16"] = ("llama.cpp", FOLDER / "f16.gguf")
    netshrink.export(w8, FOLDER / "q8.gguf")
    files["netshrink Q8_0 (its 8-bit codes)"] = ("llama.cpp", FOLDER / "q8.gguf")
    netshrink.export(w4, FOLDER / "q4.gguf")
    files["netshrink Q4_0 (its 4-bit codes)"] = ("llama.cpp", FOLDER / "q4.gguf")
    for name, kind in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = kind, 2
        llama_cpp.llama_model_quantize(str(FOLDER / "f16.gguf").encode(), str(FOLDER / f"peer_{name}.gguf").encode(), params)
        files[f"peer: llama.cpp quantize {name}"] = ("llama.cpp", FOLDER / f"peer_{name}.gguf")

    speeds: dict[str, float] = {}
    for runtime in ("ONNX Runtime", "llama.cpp"):
        runs = {name: (ort_generate if runtime == "ONNX Runtime" else llama_generate)(path)
                for name, (where, path) in files.items() if where == runtime}
        for run in runs.values():
            run(prompt)  # warm-up
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run(prompt)
                times[name].append(time.perf_counter() - started)
        for name, t in times.items():
            speeds[name] = NEW_TOKENS / float(np.median(t))
            print(f"{name}: {speeds[name]:.1f} tokens/s", flush=True)
        del runs
    fp32 = speeds["fp32 (cache)"]
    table = ["| model | runtime | file bytes | tokens/s (128 new, batch 1) | vs ONNX Runtime fp32 (cache) |", "|---|---|---|---|---|"]
    for name, (runtime, path) in files.items():
        table.append(f"| {name} | {runtime} | {path.stat().st_size:,} | {speeds[name]:.1f} | {speeds[name] / fp32:.2f}x |")
    lines = ["# A 124M-parameter GPT-2 decoder generating in ONNX Runtime and llama.cpp", "",
             command_line(__file__), f"Machine: {describe()}  ", f"Parameters: {parameters:,}  ", "", *table, "",
             "The int8 graph has no cache (its activation ranges are calibrated on the graph without one) and runs "
             "the whole sequence again for every token. ONNX Runtime and llama.cpp differ in more than the weights; "
             "compare forms within a runtime."]
    write_results(Path(__file__).parent / "results" / "decoder_deploy.md", lines)


if __name__ == "__main__":
    run_offline(main, FOLDER)
