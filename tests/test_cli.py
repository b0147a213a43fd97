"""The command line as a user meets it, run as a subprocess: every user error is one line on
stderr with exit status 2, found before long work starts; outputs never replace inputs."""
import os
import signal
import subprocess
import sys
import time

import pytest

import netshrink


def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    result = run("train", "--model", "mlp", "--data", "digits", "--epochs", "2", "-o", "dense.nsk", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "dense.nsk"


def user_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_usage_errors_are_one_line(tmp_path):
    user_error(run("train", "--batch-size", "0", "-o", "m.nsk", cwd=tmp_path), "--batch-size", ">= 1")
    user_error(run("train", "--lr", "nan", "-o", "m.nsk", cwd=tmp_path), "--lr")
    user_error(run("train", "--model", "resnet", "-o", "m.nsk", cwd=tmp_path), "invalid choice")
    user_error(run("evaluate", "missing.nsk", "--data", "digits", cwd=tmp_path), "cannot read")
    user_error(run("compress", "missing.nsk", "--data", "digits", "--prune", "1.5", "-o", "y.nsk", cwd=tmp_path), "keep")
    assert list(tmp_path.iterdir()) == []


def test_version_and_fast_help(tmp_path):
    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"netshrink {netshrink.__version__}"
    probe = subprocess.run([sys.executable, "-c", "import sys, netshrink.cli; netshrink.cli.build_parser(); "
                            "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False"  # --help does not import PyTorch


def test_a_model_on_the_wrong_data_fails_before_work(model_file, tmp_path):
    user_error(run("evaluate", model_file, "--data", "fashion-mnist", cwd=tmp_path) if os.path.isdir(
        "/usr/share/datasets/fashion-mnist") else run("compress", model_file, "--data", "mnist", "--prune", "0.5",
                                                      "-o", "out.nsk", cwd=tmp_path), "does not run on this data")
    assert not (tmp_path / "out.nsk").exists()


@pytest.mark.slow
def test_outputs_are_checked_first_and_never_replace_inputs(model_file, tmp_path):
    before = model_file.read_bytes()
    user_error(run("compress", model_file, "--data", "digits", "--prune", "0.5", "-o", model_file, cwd=tmp_path),
               "is the input file")
    user_error(run("export", model_file, "-o", model_file, cwd=tmp_path), "is the input file")
    user_error(run("train", "--data", "digits", "-o", tmp_path, cwd=tmp_path), "is a folder")
    user_error(run("bench", model_file, "--data", "digits", "--markdown", model_file / "x.md", cwd=tmp_path),
               "not a writable folder")
    user_error(run("export", model_file, "--vnni", "-o", "m.onnx", cwd=tmp_path), "--vnni goes with --int8")
    user_error(run("export", model_file, "--portable", "-o", "m.onnx", cwd=tmp_path), "--portable goes with --int8")
    assert model_file.read_bytes() == before


def test_names_are_printed_as_text_and_progress_suits_a_log(model_file, tmp_path):
    recipe = tmp_path / "weird.yaml"
    recipe.write_text("name: '[/]odd [link=http://x]name'\nsteps:\n  - prune: {keep: 0.5}\n"
                      "  - finetune: {epochs: 1, lr: 0.001}\n")
    result = run("compress", model_file, "--data", "digits", "--recipe", recipe, "-o", "small.nsk", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[/]odd [link=http://x]name" in result.stdout and "\x1b]8;" not in result.stdout
    assert "\r" not in result.stderr  # no carriage-return progress bars in a redirected log
    summary = run("summary", "small.nsk", cwd=tmp_path)
    assert "made by this recipe:" in summary.stdout and "- prune:" in summary.stdout  # YAML, not a dict


def _as_from_a_terminal():
    """The child starts as a command typed in a terminal: Ctrl-C neither ignored nor blocked,
    whatever this test process inherited or was left with (a child inherits both)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line(tmp_path):
    # Inside the full suite (never alone) the child has never seen the signal and trained to the
    # end. Why is not known: a child spawned just before this file had a clean signal state.
    # Starting it with Ctrl-C unblocked and at its default (_as_from_a_terminal) made the suite
    # pass; a run that still exits 0 says nothing about how an interrupt ends and is tried again,
    # at most twice.
    for attempt in range(3):
        output = tmp_path / f"m{attempt}.nsk"
        process = subprocess.Popen([sys.executable, "-m", "netshrink.cli", "train", "--data", "digits", "--epochs",
                                    "50", "-o", output.name], cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        if process.returncode != 0:
            break
    # 130, or death by SIGINT (which a shell also reports as 130): Python re-raises an interrupt
    # that landed inside an import once the interpreter exits. Never SIGABRT, never a traceback.
    lines = err.strip().splitlines()
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err and lines[-1] == "interrupted", \
        (process.returncode, err[-500:])
    assert all("--resume" in line for line in lines[:-1])  # a checkpoint, if an epoch had ended
    assert not output.exists()


@pytest.mark.slow
def test_an_interrupted_training_keeps_its_last_epoch_and_resumes(tmp_path):
    """Ctrl-C in `train` keeps the model after its last whole epoch (OUTPUT.partial); --resume
    continues from it, only for the same run, and the finished file replaces it."""
    command = [sys.executable, "-m", "netshrink.cli", "train", "--data", "digits", "--seed", "3", "-o", "m.nsk"]
    process = subprocess.Popen(command + ["--epochs", "100000"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
    partial = tmp_path / "m.nsk.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode in (130, -signal.SIGINT), err[-500:]
    assert "--resume" in err and "Traceback" not in err and not (tmp_path / "m.nsk").exists()
    done = netshrink.load(partial).netshrink_manifest["info"]["epochs_done"]
    assert done >= 1
    other_seed = subprocess.run([*command[:-4], "--seed", "4", "-o", "m.nsk", "--epochs", str(done + 2), "--resume"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert other_seed.returncode == 2 and "not this run's" in other_seed.stderr, other_seed.stderr
    resumed = subprocess.run(command + ["--epochs", str(done + 2), "--resume"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "m.nsk").exists() and not partial.exists()
    assert netshrink.load(tmp_path / "m.nsk").netshrink_manifest["info"]["held_out"] == {"share": 0.1, "seed": 3}


def test_ctrl_c_during_an_import_waits_for_the_import(tmp_path):
    # A module that receives Ctrl-C half-way through its own import, as PyTorch's C++ start-up
    # would: the import must finish (no abort) and the interrupt must arrive right after.
    (tmp_path / "interrupted_mid_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nfor _ in range(10**6): pass\nFINISHED = True\n")
    script = ("import sys\nfrom netshrink.cli import import_holding_ctrl_c\n"
              "try:\n    import_holding_ctrl_c('interrupted_mid_import')\n"
              "except KeyboardInterrupt:\n    print(sys.modules['interrupted_mid_import'].FINISHED)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


@pytest.mark.slow
def test_post_training_methods_from_the_command_line(model_file, tmp_path):
    result = run("compress", model_file, "--data", "digits", "--weight-bits", "3", "--weight-method", "gptq",
                 "--activation-bits", "8", "-o", "gptq.nsk", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.strip().startswith("step ")]
    assert "activations" in steps[0] and "gptq bits=3" in steps[1]  # solvers see quantized inputs
    loaded = netshrink.load(tmp_path / "gptq.nsk")
    assert max(len(set(layer.weight.detach()[0].tolist())) for layer in (loaded.fc1, loaded.fc2)) <= 7
    result = run("compress", model_file, "--data", "digits", "--prune", "0.5", "--prune-method", "wanda",
                 "-o", "wanda.nsk", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run("compress", model_file, "--data", "digits", "--weight-bits", "3", "--weight-method", "round+blocks",
                 "-o", "blocks.nsk", cwd=tmp_path)
    assert result.returncode == 0 and "block_steps=200" in result.stdout, result.stderr
    loaded = netshrink.load(tmp_path / "blocks.nsk")
    assert max(len(set(layer.weight.detach()[0].tolist())) for layer in (loaded.fc1, loaded.fc2)) <= 7
    result = run("compress", model_file, "--data", "digits", "--prune", "0.5", "--prune-method", "sparsegpt+blocks",
                 "-o", "sparse.nsk", cwd=tmp_path)
    assert result.returncode == 0 and "block_steps=200" in result.stdout, result.stderr
    assert float((netshrink.load(tmp_path / "sparse.nsk").fc1.weight == 0).float().mean()) >= 0.5
    user_error(run("compress", model_file, "--data", "digits", "--weight-method", "gptq", "-o", "x.nsk", cwd=tmp_path),
               "need --weight-bits")
    user_error(run("compress", model_file, "--data", "digits", "--weight-bits", "4", "--weight-method", "adaround",
                   "--group-size", "8", "-o", "x.nsk", cwd=tmp_path), "--group-size")
    assert not (tmp_path / "x.nsk").exists()


def test_demo_runs_and_prints_its_table(tmp_path):
    result = run("demo", "--data", "digits", "--epochs", "1", "--markdown", "demo.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "netshrink demo" in result.stdout and "all four" in result.stdout
    assert (tmp_path / "demo.md").read_text().count("\n") >= 8
