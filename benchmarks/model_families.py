"""Which transformer families netshrink compresses, and whether its data-aware methods help on each.

    python benchmarks/model_families.py          # about 5 minutes on 2 cores

One small model per Hugging Face family (4 layers, width 256, random weights from the config: no
download), the same settings for all. Random weights say nothing about accuracy on a task; what
they do show is coverage and mechanics:

* **compressed**: the share of the model's parameters in layers netshrink's methods compress
  (Linear, Embedding, and transformers' Conv1D as the Linear layers they are);
* **4-bit file**: the real file of per-channel 4-bit weights against dense fp32;
* **GPTQ / RTN**: the output error of 4-bit GPTQ over that of plain rounding (below 1: GPTQ's
  data-aware rounding works on this family's layers);
* **heads, neurons**: what ``remove_heads(heads=0.5, neurons=0.5)`` takes, the parameters left,
  and the output error of the data-aware removal over that of the magnitude one;
* **file, ONNX**: the pruned and quantized model saved and loaded (outputs identical), and its
  int8 ONNX export run by ONNX Runtime (largest difference from PyTorch over the output's scale;
  the export's default 7-bit weights, correct on every x86-64 CPU, round the 8-bit model once more).

Output errors are the squared error of the model's last hidden state over real positions, relative
to its variance, on 4 held-out batches; calibration is 16 other batches of 8 x 32 random tokens
(random images for ViT, random features for Whisper). Writes benchmarks/results/model_families.md.
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
import transformers as T

import netshrink
from netshrink.reporting.summary import parameter_count
from common import command_line, write_results  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")
WIDTH, LAYERS, HEADS, FFN, VOCAB, TOKENS = 256, 4, 8, 1024, 1000, 32


def text(generator):
    return {"input_ids": torch.randint(3, VOCAB, (8, TOKENS), generator=generator)}


FAMILIES = {
    "BERT": (lambda: T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                              num_attention_heads=HEADS, intermediate_size=FFN)), text),
    "DistilBERT": (lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=WIDTH, n_layers=LAYERS, n_heads=HEADS,
                                                                hidden_dim=FFN)), text),
    "MPNet": (lambda: T.MPNetModel(T.MPNetConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                                 num_attention_heads=HEADS, intermediate_size=FFN)), text),
    "GPT-2": (lambda: T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                               n_positions=64, bos_token_id=0, eos_token_id=0)), text),
    "Llama (8 query, 2 key/value heads)": (
        lambda: T.LlamaModel(T.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                           num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=FFN)), text),
    "Qwen2 (8 query, 4 key/value heads)": (
        lambda: T.Qwen2Model(T.Qwen2Config(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                           num_attention_heads=HEADS, num_key_value_heads=4, intermediate_size=FFN)), text),
    "BART": (lambda: T.BartModel(T.BartConfig(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=LAYERS // 2,
                                              decoder_layers=LAYERS // 2, encoder_attention_heads=HEADS,
                                              decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                                              max_position_embeddings=64)), text),
    "CLIP text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                                           num_attention_heads=HEADS, intermediate_size=FFN,
                                                           max_position_embeddings=64, bos_token_id=0, eos_token_id=2)),
                  text),
    "ViT": (lambda: T.ViTModel(T.ViTConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                           intermediate_size=FFN, image_size=64, patch_size=8)),
            lambda g: {"pixel_values": torch.randn(8, 3, 64, 64, generator=g)}),
    "Whisper": (lambda: T.WhisperModel(T.WhisperConfig(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=LAYERS // 2,
                                                       decoder_layers=LAYERS // 2, encoder_attention_heads=HEADS,
                                                       decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                                                       decoder_ffn_dim=FFN, num_mel_bins=16, max_source_positions=32,
                                                       max_target_positions=32, pad_token_id=0, bos_token_id=1,
                                                       eos_token_id=2, decoder_start_token_id=1)),
                lambda g: {"input_features": torch.randn(8, 16, 64, generator=g),
                           "decoder_input_ids": torch.randint(3, VOCAB, (8, 16), generator=g)}),
}


def relative_error(model, dense, batches) -> float:
    with torch.no_grad():
        outputs = [(model(**b).last_hidden_state, dense(**b).last_hidden_state) for b in batches]
    error = sum(float((y - d).square().sum()) for y, d in outputs)
    return error / sum(float((d - d.mean()).square().sum()) for _, d in outputs)


def compressed_share(model) -> float:
    rows = netshrink.summary(model, file_bytes=0).rows
    return sum(r["weights"] for r in rows) / parameter_count(model)


def family_row(name, make, inputs, folder: Path) -> str:
    torch.manual_seed(0)
    dense = make().eval()
    generator = torch.Generator().manual_seed(0)
    calibration = [inputs(generator) for _ in range(16)]
    held_out = [inputs(generator) for _ in range(4)]
    share = compressed_share(dense)

    rounded = copy.deepcopy(dense)
    netshrink.quantize(rounded, weight_bits=4)
    netshrink.save(rounded, folder / "rounded.nsk")
    file_ratio = 4 * parameter_count(dense) / (folder / "rounded.nsk").stat().st_size
    gptq = copy.deepcopy(dense)
    netshrink.quantize(gptq, weight_bits=4, method="gptq", calibration=calibration)
    gptq_ratio = relative_error(gptq, dense, held_out) / relative_error(rounded, dense, held_out)

    by_magnitude = copy.deepcopy(dense)
    heads = 0.5
    try:
        report = netshrink.remove_heads(by_magnitude, heads=heads, neurons=0.5)
    except netshrink.NetshrinkError:  # no heads netshrink can take (the note below the table says why)
        heads = 1.0
        report = netshrink.remove_heads(by_magnitude, heads=heads, neurons=0.5)
    taken = (f"{sum('heads' in d and 'neurons' not in d for _, d in report.changed)} attention, "
             f"{sum('neurons' in d for _, d in report.changed)} feed-forward blocks"
             + (" (heads refused)" if heads == 1.0 else ""))
    aware = copy.deepcopy(dense)
    netshrink.remove_heads(aware, heads=heads, neurons=0.5, calibration=calibration)
    left = parameter_count(aware) / parameter_count(dense)
    aware_ratio = relative_error(aware, dense, held_out) / relative_error(by_magnitude, dense, held_out)

    netshrink.quantize(aware, weight_bits=8, activation_bits=8, calibration=calibration)
    netshrink.save(aware, folder / "small.nsk")
    loaded = netshrink.load(folder / "small.nsk")
    with torch.no_grad():
        same = all(torch.equal(loaded(**b).last_hidden_state, aware(**b).last_hidden_state) for b in held_out)
    onnx = "-"
    try:
        import onnxruntime as ort

        netshrink.export(aware, folder / "small.onnx", int8=True, calibration=calibration, example_inputs=held_out[0])
        session = ort.InferenceSession(str(folder / "small.onnx"), providers=["CPUExecutionProvider"])
        feed = {i.name: held_out[0][i.name].numpy() for i in session.get_inputs()}
        got = session.run(None, feed)[0]
        with torch.no_grad():
            expected = aware(**held_out[0]).last_hidden_state.numpy()
        onnx = f"{np.abs(got - expected).max() / np.abs(expected).max():.3f}"
    except netshrink.NetshrinkError as refused:
        onnx = f"refused: {refused}"
    return (f"| {name} | {share:.1%} | {file_ratio:.1f}x | {gptq_ratio:.2f} | {taken} | {left:.1%} | "
            f"{aware_ratio:.2f} | {'identical' if same else 'DIFFERENT'} | {onnx} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES), default=list(FAMILIES),
                        help="which families to run (default: all)")
    parser.add_argument("--output", default="model_families.md", help="file name under benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.families:
            start = time.perf_counter()
            make, inputs = FAMILIES[name]
            rows.append(family_row(name, make, inputs, Path(folder)))
            print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    write_results(RESULTS / args.output, [
        "# Transformer families: what netshrink compresses on each", "",
        command_line(__file__),
        f"torch {torch.__version__}, transformers {T.__version__}. One model per family, {LAYERS} layers (encoder + "
        f"decoder for BART and Whisper), width {WIDTH}, {HEADS} heads, feed-forward {FFN}, random weights from the "
        "config; errors relative to the output's variance on 4 held-out batches, calibration 16 other batches "
        "(see the script's docstring). The int8 ONNX graphs have 7-bit weights (the export's default for "
        "every x86-64 CPU), so they differ from the 8-bit PyTorch model by that rounding too.", "",
        "| family | parameters in compressed layers | 4-bit file vs fp32 | GPTQ / RTN error | remove_heads(0.5, 0.5) takes | "
        "parameters left | data-aware / magnitude error | W8A8 file loaded | int8 ONNX Runtime vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])


if __name__ == "__main__":
    main()
