"""Forged files: a valid checksum proves nothing about who wrote a file. Each class of forgery a
stranger can reseal gets one NetshrinkError line before any time or memory is spent on it, never a
network request, and never a model that loads but cannot run."""
import gzip
import http.server
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import pytest
import torch

import netshrink
from netshrink.store import artifact
from netshrink.store.codec import weights as codec
from netshrink.store.fuzz import edit_manifest, manifest_text, reseal
from netshrink.compress.recipe import Recipe

transformers = pytest.importorskip("transformers")


def _bert_file(tmp_path: Path) -> bytes:
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, num_labels=3)
    torch.manual_seed(0)
    netshrink.save(transformers.BertForSequenceClassification(config).eval(), tmp_path / "bert.nsk")
    return (tmp_path / "bert.nsk").read_bytes()


def _forge(data: bytes, old: str, new: str, path: Path) -> Path:
    path.write_bytes(reseal(edit_manifest(data, old, new)))
    return path


def _refused_quickly(path: Path, match: str | None = None, model=None) -> str:
    """Load ``path``: one NetshrinkError line, with little memory and time (bounds far above an
    honest load of these small files, far below what the forgeries asked for)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(netshrink.NetshrinkError, match=match) as info:
            netshrink.load(path, model=model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and peak < 64 << 20, (message, peak)
    assert time.perf_counter() - started < 30  # a hang would be minutes; the honest load takes well under a second
    return message


STAND_IN = """
import sys
import netshrink
for path in sys.argv[1:]:
    try:
        netshrink.load(path)
        print("loaded")
    except netshrink.NetshrinkError as exc:
        print("refused:", exc)
"""


@pytest.mark.slow
def test_no_network_request_whatever_the_recorded_config_names(tmp_path):
    """A stand-in Hub on this machine (HF_ENDPOINT) counts requests. transformers itself asks it
    about a kernel repository named as the attention implementation; loading files whose configs
    name one, remote code or a quantizer asks it nothing."""
    data = _bert_file(tmp_path)
    requests = []

    class StandInHub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"
    try:
        direct = "import transformers\ntry:\n    transformers.BertModel(transformers.BertConfig(hidden_size=32, " \
                 "num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, attn_implementation='org/repo'))\n" \
                 "except Exception:\n    pass\n"
        subprocess.run([sys.executable, "-c", direct], env=env, timeout=120, check=True)
        assert requests, "the stand-in Hub must see what transformers asks, or this test proves nothing"
        requests.clear()
        forgeries = {"attn": ('"model_type":"bert"', '"attn_implementation":"org/repo","model_type":"bert"'),
                     "internal": ('"model_type":"bert"', '"_attn_implementation":"kernels-community/flash-attn",'
                                                         '"model_type":"bert"'),
                     "experts": ('"model_type":"bert"', '"experts_implementation":"org/repo","model_type":"bert"'),
                     "auto_map": ('"model_type":"bert"', '"auto_map":{"AutoModel":"org/repo--model.M"},"model_type":"bert"'),
                     "quantizer": ('"model_type":"bert"', '"quantization_config":{"quant_method":"gptq"},"model_type":"bert"'),
                     "remote": ('"model_type":"bert"', '"trust_remote_code":true,"model_type":"bert"')}
        paths = [str(_forge(data, old, new, tmp_path / f"{label}.nsk")) for label, (old, new) in forgeries.items()]
        out = subprocess.run([sys.executable, "-c", STAND_IN, *paths], env=env, timeout=300,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert len(out) == len(paths) and all(line.startswith("refused: bad model spec") for line in out), out
        assert requests == []
    finally:
        server.shutdown()


@pytest.mark.parametrize("old, new, match", [
    ('"vocab_size":120', '"vocab_size":16777216', "does not fit"),
    ('"max_position_embeddings":40', '"max_position_embeddings":16777216', "does not fit"),
    ('"num_hidden_layers":2', '"num_hidden_layers":1000', "num_hidden_layers"),
    ('"id2label":{"0":"LABEL_0"', '"id2label":{' + ",".join(f'"{i}":"L"' for i in range(3, 200)) + ',"0":"LABEL_0"', "labels"),
    ('"type_vocab_size":2', '"type_vocab_size":16777216', "does not fit"),
])
def test_a_config_that_asks_for_a_huge_model_is_refused_before_it_is_built(tmp_path, old, new, match):
    data = _bert_file(tmp_path)
    _refused_quickly(_forge(data, old, new, tmp_path / "f.nsk"), match)


def test_a_config_width_beyond_the_stored_layers_costs_nothing_and_the_model_runs(tmp_path):
    """A recorded width larger than the stored layers is what a head-pruned file has: the model
    is built on the meta device, so it costs nothing, and the stored layers are the ones it runs."""
    data = _bert_file(tmp_path)
    path = _forge(data, '"intermediate_size":64', '"intermediate_size":16777216', tmp_path / "f.nsk")
    tracemalloc.start()
    model = netshrink.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20
    honest = netshrink.load(tmp_path / "bert.nsk")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=ids).logits, honest(input_ids=ids).logits)


def test_a_tensor_that_cannot_fit_its_layer_is_refused_before_its_payload_is_decoded(tmp_path, trained):
    trained.fc1.bias.data.zero_()  # stored as one constant: 5 bytes that could claim any size
    netshrink.save(trained, tmp_path / "m.nsk")
    data = (tmp_path / "m.nsk").read_bytes()
    with mock.patch.object(codec, "_decode", side_effect=AssertionError("decoded")):
        for shape in ("[268435456]", "[600]", "[300,2]"):
            _refused_quickly(_forge(data, '"fc1.bias",[300]', f'"fc1.bias",{shape}', tmp_path / "f.nsk"), "does not fit")
            _refused_quickly(tmp_path / "f.nsk", "does not fit", model=netshrink.build_model("lenet-300-100", (1, 8, 8)))


def test_a_zoo_spec_that_asks_for_huge_inputs_allocates_nothing(tmp_path, trained):
    netshrink.save(trained, tmp_path / "m.nsk")
    data = (tmp_path / "m.nsk").read_bytes()
    _refused_quickly(_forge(data, '"in_shape":[1,8,8]', '"in_shape":[1,2048,2048]', tmp_path / "f.nsk"),
                     "rebuilds by itself")
    # Within the bound, a spec that disagrees with the stored first layer fails its forward pass.
    _refused_quickly(_forge(data, '"in_shape":[1,8,8]', '"in_shape":[1,16,16]', tmp_path / "f.nsk"), "cannot run")


def test_decoding_work_is_bounded_by_what_an_encoder_writes():
    """A stream may not claim more lines (one decoder call each) than the encoder ever writes."""
    values = torch.randn(8, generator=torch.Generator().manual_seed(0))
    shared = values[torch.randint(0, 8, (4096, 4), generator=torch.Generator().manual_seed(1))]
    payload = bytearray(codec.encode(shared.numpy()))
    assert payload[0] == codec.CODEBOOK
    payload[1] &= ~codec.COLUMNS  # lines along rows
    payload[2] = 1  # the varint after kind and flags: one row per line
    started = time.process_time()
    with pytest.raises(netshrink.NetshrinkError, match="line length"):
        codec.decode(bytes(payload), (1 << 22, 1))
    assert time.process_time() - started < 1


def test_odd_version_fields_and_shapes_are_one_line_errors(tmp_path, trained):
    netshrink.save(trained, tmp_path / "m.nsk")
    data = (tmp_path / "m.nsk").read_bytes()
    for version in ("\u00b2", "9" * 5000, "-1", "5.0", ""):
        header = json.dumps({"__metadata__": {"netshrink": version}, "netshrink": {"dtype": "U8", "shape": [1],
                                                                                  "data_offsets": [0, 1]}}).encode()
        (tmp_path / "v.nsk").write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
        _refused_quickly(tmp_path / "v.nsk")
    buffers = netshrink.build_model("resmobile", (1, 8, 8))
    netshrink.save(buffers, tmp_path / "bn.nsk")
    data = (tmp_path / "bn.nsk").read_bytes()
    step = re.search(r'"stem\.bn\.num_batches_tracked",\[\],8', manifest_text(data)[0]).group(0)
    for shape in ("[true]", "[" + ",".join(["1"] * 100) + "]", "[1.0]", '["1"]'):
        _refused_quickly(_forge(data, step, step.replace("[]", shape), tmp_path / "f.nsk"))


def test_running_out_of_memory_is_one_line_and_the_callers_model_stays(tmp_path, trained):
    netshrink.save(trained, tmp_path / "m.nsk")
    target = netshrink.build_model("lenet-300-100", (1, 8, 8), seed=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with mock.patch.object(artifact, "_decode_all", side_effect=MemoryError()):
        with pytest.raises(netshrink.NetshrinkError, match="not enough memory"):
            netshrink.load(tmp_path / "m.nsk", model=target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_model_that_would_not_run_or_computes_inf_is_refused(tmp_path, trained):
    data = _bert_file(tmp_path)
    # A classifier bias of 2 values for its 3 outputs (a narrower layer than the config's is allowed).
    narrow = _forge(data, '"classifier.bias",[3]', '"classifier.bias",[2]', tmp_path / "narrow.nsk")
    _refused_quickly(narrow, "cannot run")
    # fc2 narrowed to fewer inputs than fc1 gives it (each layer's own tensors agree): written
    # as a forger would, from a broken copy of the model; it fails a forward pass on a tiny input.
    broken = netshrink.build_model("lenet-300-100", (1, 8, 8))
    broken.fc2.weight = torch.nn.Parameter(trained.fc2.weight.detach()[:, :200].clone())
    netshrink.save(broken, tmp_path / "chain.nsk")
    _refused_quickly(tmp_path / "chain.nsk", "cannot run")
    # Weights of 3e38: finite, but the outputs are not.
    huge = netshrink.build_model("lenet-300-100", (1, 8, 8))
    with torch.no_grad():
        huge.fc1.weight.fill_(3e38)
    netshrink.save(huge, tmp_path / "huge.nsk")
    _refused_quickly(tmp_path / "huge.nsk", "inf or NaN")


def test_a_negative_running_variance_is_refused_even_for_a_callers_model(tmp_path):
    """A caller's model has no input the file knows, so it is checked by its layers' own tensors."""
    model = netshrink.build_model("resmobile", (1, 8, 8))
    with torch.no_grad():
        model.stem.bn.running_var[3] = -1.0
    netshrink.save(model, tmp_path / "m.nsk")
    _refused_quickly(tmp_path / "m.nsk", "negative running variance")
    _refused_quickly(tmp_path / "m.nsk", "negative running variance", model=netshrink.build_model("resmobile", (1, 8, 8)))


def test_inf_and_nan_load_only_where_they_were_saved(tmp_path, trained):
    with torch.no_grad():
        trained.fc3.bias[0] = float("-inf")  # on purpose: this class never wins
    netshrink.save(trained, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk")
    assert loaded.fc3.bias[0] == float("-inf") and torch.equal(loaded.fc1.weight, trained.fc1.weight)
    data = (tmp_path / "m.nsk").read_bytes()
    _refused_quickly(_forge(data, '"nonfinite":["fc3.bias"]', '"nonfinite":["fc2.bias"]', tmp_path / "f.nsk"),
                     "inf or NaN")


def test_files_that_are_not_regular_files_are_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(netshrink.NetshrinkError, match="not a regular file"):
        netshrink.load(fifo)
    with pytest.raises(netshrink.NetshrinkError, match="not a regular file"):
        Recipe.load(str(fifo))
    with pytest.raises(netshrink.NetshrinkError, match="not a regular file"):
        netshrink.zoo.datasets.read_idx(fifo)
    with pytest.raises(netshrink.NetshrinkError, match="not a regular file"):
        netshrink.load(tmp_path)
    out = subprocess.run([sys.executable, "-m", "netshrink.cli", "summary", str(fifo)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "not a regular file" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_an_idx_file_is_read_no_further_than_its_header_declares(tmp_path):
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 10, 28, 28))
        for _ in range(64):
            f.write(bytes(1 << 20))  # 64 MiB of zeros in a file of about 64 KiB
    tracemalloc.start()
    with pytest.raises(netshrink.NetshrinkError, match="holds more"):
        netshrink.zoo.datasets.read_idx(bomb)
    assert tracemalloc.get_traced_memory()[1] < 4 << 20
    tracemalloc.stop()
    huge = tmp_path / "huge-idx3-ubyte"
    huge.write_bytes(struct.pack(">HBB3I", 0, 8, 3, 1 << 30, 1 << 10, 1 << 10))
    with pytest.raises(netshrink.NetshrinkError, match="declares"):
        netshrink.zoo.datasets.read_idx(huge)
    fine = tmp_path / "fine-idx1-ubyte"
    fine.write_bytes(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 2, 3]))
    assert netshrink.zoo.datasets.read_idx(fine).tolist() == [1, 2, 3]


def test_recipes_with_aliases_or_deep_nesting_are_refused_at_once():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    for text, match in ((laughs, "aliases"), ("[" * 3000 + "]" * 3000, "nested"), ("{a: " * 3000 + "1" + "}" * 3000, "nested")):
        started = time.process_time()
        with pytest.raises(netshrink.NetshrinkError, match=match):
            Recipe.from_yaml(text)
        assert time.process_time() - started < 5
    assert Recipe.from_yaml("steps:\n  - prune: {keep: 0.5}\n").steps[0].action.keep == 0.5


def test_clip_and_save_settings_are_checked_like_every_other(trained, tmp_path):
    before = trained.fc1.weight.detach().clone()
    with pytest.raises(netshrink.NetshrinkError, match="value must be a number in"):
        netshrink.clip(trained, threshold=0.1, value=1e39)
    with pytest.raises(netshrink.NetshrinkError, match="threshold must be a number in"):
        netshrink.clip(trained, threshold=1e39)
    assert torch.equal(trained.fc1.weight, before)
    for info in ({"when": object()}, {"loss": float("nan")}, {"deep": [float("inf")]}, ["not", "a", "dict"]):
        with pytest.raises(netshrink.NetshrinkError, match="info must"):
            netshrink.save(trained, tmp_path / "m.nsk", info=info)
    assert not (tmp_path / "m.nsk").exists()
    netshrink.save(trained, tmp_path / "m.nsk", info={"loss": 0.25, "tags": ["a", None, True]})
    assert netshrink.load(tmp_path / "m.nsk").netshrink_manifest["info"]["loss"] == 0.25
