"""Several processes, one result: ``fit`` and calibration under ``torchrun`` with 2 processes (gloo, on
this CPU) give what one process gives on the same data, one process writes the file, and a process
that fails stops the job with its error and no file.

Tolerances: training with the same global batch and seed matches to float rounding (gradients are
averaged in another order; 1e-6 after an epoch); masks are identical. Calibration statistics are sums
in another order (relative 1e-5); GPTQ then rounds the same but for the rare weight within float
rounding of half a step (at most 1 in 1,000 codes here), whose error it passes on to the next columns.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import netshrink
from netshrink.compress.calibration import dense_statistics

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

SETUP = """
import sys
import numpy as np
import torch
import netshrink
from netshrink.training import distributed

distributed.start()
train = netshrink.load_dataset("digits", "train")
torch.manual_seed(0)
model = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
"""


def run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(SETUP + textwrap.dedent(body))
    return subprocess.run([*TORCHRUN, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def single(prune: bool = True) -> torch.nn.Module:
    train = netshrink.load_dataset("digits", "train")
    torch.manual_seed(0)
    model = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
    if prune:
        netshrink.prune(model, keep=0.3)
        netshrink.quantize(model, weight_bits=4)
        netshrink.fit(model, train, epochs=1, batch_size=64, lr=2e-3, seed=3, progress=False)
    return model


def test_training_on_two_processes_gives_one_process_model(tmp_path):
    result = run(tmp_path, """
        netshrink.prune(model, keep=0.3)
        netshrink.quantize(model, weight_bits=4)
        netshrink.fit(model, train, epochs=1, batch_size=64, lr=2e-3, seed=3, progress=False)
        size = netshrink.save(model, "two.nsk")
        np.save(f"rank{distributed.rank()}.npy", model.fc1.weight.detach().numpy())
        assert size > 0
        distributed.stop()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob("*.tmp*")) and (tmp_path / "two.nsk").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))  # ranks agree
    two, one = netshrink.load(tmp_path / "two.nsk"), single()
    for name in ("fc1", "fc2", "fc3"):
        a, b = getattr(one, name), getattr(two, name)
        assert torch.equal(a.parametrizations.weight[0].mask, b.parametrizations.weight[0].mask), name
        for tensor in ("weight", "bias"):  # the weight as it computes: masked, on its 4-bit grid
            assert torch.allclose(getattr(a, tensor), getattr(b, tensor), atol=1e-6), (name, tensor)


def test_calibration_statistics_on_two_processes_equal_one_process(tmp_path):
    needs = frozenset({"hessian", "mean", "sumsq"})
    result = run(tmp_path, """
        from netshrink.compress.calibration import dense_statistics
        layers = {name: getattr(model, name) for name in ("fc1", "fc2", "fc3")}
        stats = dense_statistics(model, layers, train, frozenset({"hessian", "mean", "sumsq"}), samples=300, batch_size=64)
        if distributed.is_main():
            np.savez("stats.npz", **{f"{n}.{k}": getattr(s, k).numpy() for n, s in stats.items()
                                     for k in ("hessian", "sum", "sumsq")}, **{f"{n}.count": s.count for n, s in stats.items()})
        distributed.stop()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    two = np.load(tmp_path / "stats.npz")
    model = single(prune=False)
    layers = {name: getattr(model, name) for name in ("fc1", "fc2", "fc3")}
    one = dense_statistics(model, layers, netshrink.load_dataset("digits", "train"), needs, samples=300, batch_size=64)
    for name, stats in one.items():
        assert int(two[f"{name}.count"]) == stats.count == 300
        for kind in ("hessian", "sum", "sumsq"):
            np.testing.assert_allclose(two[f"{name}.{kind}"], getattr(stats, kind).numpy(), rtol=1e-5, atol=1e-6)


def test_the_command_line_under_torchrun_and_gptq_codes(tmp_path):
    command = [sys.executable, "-m", "netshrink"]
    dense = tmp_path / "dense.nsk"
    subprocess.run([*command, "train", "--model", "lenet-300-100", "--data", "digits", "--epochs", "3", "-o", str(dense)],
                   check=True, capture_output=True)
    settings = ["--data", "digits", "--weight-bits", "4", "--weight-method", "gptq"]
    two = subprocess.run([*TORCHRUN, "-m", "netshrink", "compress", str(dense), *settings, "-o", str(tmp_path / "two.nsk")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("result (") == 1  # one process reports
    subprocess.run([*command, "compress", str(dense), *settings, "-o", str(tmp_path / "one.nsk")], check=True,
                   capture_output=True)
    a, b = netshrink.load(tmp_path / "one.nsk"), netshrink.load(tmp_path / "two.nsk")
    flipped = total = 0
    for name in ("fc1", "fc2", "fc3"):
        scale = getattr(a, name).parametrizations.weight[0].scale.detach().reshape(-1, 1)
        steps = (getattr(a, name).weight - getattr(b, name).weight).detach().abs() / scale
        flipped, total = flipped + int((steps > 0.5).sum()), total + steps.numel()
    assert flipped <= total // 1000, (flipped, total)


def test_a_failing_process_stops_the_job_with_its_error_and_no_file(tmp_path):
    result = run(tmp_path, """
        if distributed.rank() == 1:
            train.tensors[0][0, 0, 0, 0] = float("nan")  # this process's data is broken
        netshrink.fit(model, train, epochs=1, progress=False)
        netshrink.save(model, "never.nsk")
    """)
    assert result.returncode != 0
    assert "NetshrinkError: the data contains NaN" in result.stderr
    assert not (tmp_path / "never.nsk").exists() and not list(tmp_path.glob("never*"))


def test_activation_ranges_and_export_on_two_processes(tmp_path):
    """Each process observes a share of the calibration examples: min/max ranges equal one process's
    exactly; an export is written once, by the first process, and the others get no report."""
    result = run(tmp_path, """
        netshrink.quantize(model, activation_bits=8, calibration=train)
        ranges = [[float(getattr(model, n).input_quantizer.low), float(getattr(model, n).input_quantizer.high)]
                  for n in ("fc1", "fc2", "fc3")]
        report = netshrink.export(model, "model.onnx")
        np.save(f"ranges{distributed.rank()}.npy", np.array(ranges))
        assert (report is None) == (distributed.rank() == 1)
        distributed.stop()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model.onnx").exists() and not list(tmp_path.glob("*.tmp*"))
    model = single(prune=False)
    netshrink.quantize(model, activation_bits=8, calibration=netshrink.load_dataset("digits", "train"))
    one = [[float(getattr(model, n).input_quantizer.low), float(getattr(model, n).input_quantizer.high)]
           for n in ("fc1", "fc2", "fc3")]
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"ranges{rank}.npy"), np.array(one))


def test_the_command_line_on_a_local_ray_cluster(tmp_path):
    """`--ray local --workers 2`: Ray Train runs the command as two processes of one group, which make
    the one-process model to float rounding; the first process's tables are printed once; a process
    that fails is one line naming it, and no file is written."""
    pytest.importorskip("ray.train")
    command = [sys.executable, "-m", "netshrink"]
    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([*command, "train", "--data", "digits", "--epochs", "2", "-o", "dense.nsk"], cwd=tmp_path,
                   check=True, capture_output=True)
    settings = ["compress", "dense.nsk", "--data", "digits", "--prune", "0.3", "--finetune", "1"]
    subprocess.run([*command, *settings, "-o", "one.nsk"], cwd=tmp_path, check=True, capture_output=True)
    two = subprocess.run([*command, *settings, "-o", "two.nsk", "--ray", "local", "--workers", "2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("result (") == 1 and "2 processes" in two.stdout
    a, b = netshrink.load(tmp_path / "one.nsk"), netshrink.load(tmp_path / "two.nsk")
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(a, name).parametrizations.weight[0].mask, getattr(b, name).parametrizations.weight[0].mask)
        assert torch.allclose(getattr(a, name).weight, getattr(b, name).weight, atol=1e-6)
    (tmp_path / "forged.nsk").write_bytes((tmp_path / "dense.nsk").read_bytes()[:-100])  # cut short
    failed = subprocess.run([*command, "compress", "forged.nsk", "--data", "digits", "--prune", "0.3", "-o", "never.nsk",
                             "--ray", "local", "--workers", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].startswith("error: process "), failed.stderr
    assert not list(tmp_path.glob("never*"))


def test_sharded_training_on_two_processes_gives_one_process_model(tmp_path):
    """FSDP (shard=True) splits the parameters, gradients and Adam's moments between the processes,
    trains the same steps, and brings the whole model back: the one-process model to float rounding,
    masks identical; gradual pruning, which reads the model's own weights every step, is refused."""
    result = run(tmp_path, """
        netshrink.prune(model, keep=0.3)
        netshrink.quantize(model, weight_bits=4)
        sharded = distributed.sharded_copy(model)
        local = sum(p.to_local().numel() for p in sharded.parameters())
        assert local < 0.6 * sum(p.numel() for p in model.parameters()), local  # each process keeps about half
        netshrink.fit(model, train, epochs=1, batch_size=64, lr=2e-3, seed=3, progress=False, shard=True)
        np.save(f"rank{distributed.rank()}.npy", model.fc1.weight.detach().numpy())
        netshrink.save(model, "sharded.nsk")
        try:
            netshrink.fit(model, train, epochs=1, shard=True, on_step=lambda step, total: None, progress=False)
        except netshrink.NetshrinkError as exc:
            assert "sharded training" in str(exc)
        else:
            raise AssertionError("a step callback was accepted")
        distributed.stop()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))
    two, one = netshrink.load(tmp_path / "sharded.nsk"), single()
    for name in ("fc1", "fc2", "fc3"):
        a, b = getattr(one, name), getattr(two, name)
        assert torch.equal(a.parametrizations.weight[0].mask, b.parametrizations.weight[0].mask), name
        for tensor in ("weight", "bias"):
            assert torch.allclose(getattr(a, tensor), getattr(b, tensor), atol=1e-6), (name, tensor)


def test_batch_norm_over_two_processes_normalises_by_the_whole_batch(tmp_path):
    """A CNN with BatchNorm, residual adds and depthwise convolutions: two processes with half of a
    batch each give one process's gradients and running statistics on the whole batch (each
    process's own statistics would not: Adam would then carry the difference into every weight)."""
    result = run(tmp_path, """
        torch.manual_seed(0)
        net = netshrink.build_model("resmobile", in_shape=(1, 8, 8))
        x, y = train.tensors[0][:64], train.tensors[1][:64]
        part = slice(32 * distributed.rank(), 32 * (distributed.rank() + 1))
        runner = torch.nn.parallel.DistributedDataParallel(net)  # as fit does: DDP first, then the statistics' group
        with distributed.batch_norm_over_processes(net):
            torch.nn.functional.cross_entropy(runner(x[part]), y[part]).backward()
        if distributed.is_main():
            torch.save({**{n: p.grad for n, p in net.named_parameters()}, **dict(net.named_buffers())}, "two.pt")
        distributed.stop()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    train = netshrink.load_dataset("digits", "train")
    torch.manual_seed(0)
    net = netshrink.build_model("resmobile", in_shape=(1, 8, 8))
    torch.nn.functional.cross_entropy(net(train.tensors[0][:64]), train.tensors[1][:64]).backward()
    two = torch.load(tmp_path / "two.pt")
    one = {**{n: p.grad for n, p in net.named_parameters()}, **dict(net.named_buffers())}
    assert any("running_var" in name for name in one)
    for name, value in one.items():
        assert torch.allclose(value.float(), two[name].float(), rtol=1e-4, atol=1e-6), name


def test_block_reconstruction_on_two_processes_takes_one_process_steps(tmp_path):
    """Each process tunes on a share of every calibration batch, errors and gradients summed over
    them: the same 4-bit codes as one process, but for the rare weight whose sign step sits within
    float rounding of zero."""
    body = """
        netshrink.fit(model, train, epochs=2, batch_size=64, seed=1, progress=False)
        netshrink.quantize(model, weight_bits=4, method="round+blocks", calibration=train)
    """
    result = run(tmp_path, body + """
        netshrink.save(model, "two.nsk")
        distributed.stop()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    one = single(prune=False)
    train = netshrink.load_dataset("digits", "train")
    netshrink.fit(one, train, epochs=2, batch_size=64, seed=1, progress=False)
    netshrink.quantize(one, weight_bits=4, method="round+blocks", calibration=train)
    two = netshrink.load(tmp_path / "two.nsk")
    flipped = total = 0
    for name in ("fc1", "fc2", "fc3"):
        a, b = getattr(one, name).weight.detach(), getattr(two, name).weight.detach()
        scale = a.abs().amax(dim=1, keepdim=True) / 7
        flipped, total = flipped + int(((a - b).abs() > 0.5 * scale).sum()), total + a.numel()
    assert flipped <= total // 1000, (flipped, total)
