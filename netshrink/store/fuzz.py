"""Hostile files: mutate valid netshrink files and classify what loading them does.

Used by the test suite (a few hundred files, seconds) and by ``benchmarks/fuzz_files.py``
(tens of thousands). Two kinds of mutation:

* ``raw``: bytes flipped, set, inserted, deleted, or the file cut short, as disk or network damage
  would do. The whole-file checksum must catch every one: a raw mutation that loads is a failure.
* ``resealed``: the same damage, then the checksum recomputed, as someone forging a file would do.
  These reach the parser and decoders behind the checksum, which must still answer with one
  ``NetshrinkError``, allocate no more than the file's tensors decode to, and never leave a
  caller's model changed. A resealed file that loads is allowed only if it loads bit-exactly what
  the manifest and tensors now say (it is a valid file).
"""
from __future__ import annotations

import hashlib
import random
import re

from .artifact import (BLOB, DIGEST_BYTES, DIGEST_KEY, _blob_offset, _digest_marker, _file_digest, _header, assemble, blob_digest, manifest_section)

KINDS = ("flip bit", "set byte", "insert bytes", "delete bytes", "truncate", "header length", "json edit",
         "manifest edit", "forge")
# What a forger writes into a manifest (kind "forge"): sizes that would cost time or memory,
# shapes that are not shapes, fields that name code or a repository, label maps and version
# fields no writer makes. Each is inserted where its pattern first matches.
NUMBERS = ("0", "1", "-1", "2", "3", "16777216", "268435456", "1099511627775", "2147483648", "1e308", "true", "null")
CODE_FIELDS = ('"attn_implementation":"org/repo",', '"_attn_implementation":"kernels-community/flash-attn",',
               '"auto_map":{"AutoModel":"org/repo--m.M"},', '"trust_remote_code":true,',
               '"quantization_config":{"quant_method":"gptq"},', '"experts_implementation":"org/repo",')
SHAPES = ("[true]", "[" + ",".join(["1"] * 100) + "]", "[1.5]", '["2"]', "[]", "[-1]", "[268435456]", "[16777216,32]")


def manifest_text(data: bytes) -> tuple[str, bytes] | None:
    """A format-3 file's manifest JSON and the payload bytes after it (None if unreadable)."""
    try:
        text, payloads = manifest_section(data)
        return text.decode(), bytes(data[payloads:])
    except Exception:  # noqa: BLE001 - damaged input is simply not edited
        return None


def edit_manifest(data: bytes, old: str, new: str) -> bytes:
    """A format-3 file with ``old`` replaced by ``new`` in its manifest, keeping the old checksum
    (so the file fails it; :func:`reseal` makes it pass)."""
    text, payloads = manifest_text(data)
    if old not in text:
        raise ValueError(f"{old!r} is not in the manifest")
    return _with_manifest(data, text.replace(old, new, 1), payloads)


def _with_manifest(data: bytes, text: str, payloads: bytes) -> bytes:
    edited = bytearray(assemble(text, [payloads]))
    at, old_at = _blob_offset(edited), _blob_offset(data)
    edited[at:at + DIGEST_BYTES] = data[old_at:old_at + DIGEST_BYTES]
    return bytes(edited)


def reseal(data: bytes) -> bytes:
    """``data`` with its whole-file checksum recomputed (unchanged if the header is unreadable)."""
    try:
        header = _header(data, "file")
        digest = header.get("__metadata__", {}).get(DIGEST_KEY)
    except Exception:  # noqa: BLE001 - an unreadable header is simply left as it is
        return data
    if BLOB in header:  # format 3: SHA-256 at the start of the blob
        at = _blob_offset(data)
        if len(data) < at + DIGEST_BYTES:
            return data
        return data[:at] + blob_digest(data) + data[at + DIGEST_BYTES:]
    if not isinstance(digest, str):
        return data
    marker = _digest_marker(digest)
    at = data.find(marker, 8)
    if at < 0:
        return data
    fresh = _digest_marker(_file_digest(data, at, len(marker)))
    return data[:at] + fresh + data[at + len(marker):]


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of ``data``: (kind, mutated bytes). Mutations favour the header and
    manifest (where sizes, shapes and settings live) as well as payloads."""
    kind = rng.choice(KINDS)
    out = bytearray(data)
    header_end = min(len(data), 8 + int.from_bytes(data[:8], "little"))
    at = rng.randrange(len(out)) if rng.random() < 0.5 else rng.randrange(min(len(out), header_end))
    if kind == "flip bit":
        out[at] ^= 1 << rng.randrange(8)
    elif kind == "set byte":
        out[at] = rng.choice((0, 0xFF, 0x7F, 0x80, ord("9"), ord("-"), ord("]"), ord("e"), rng.randrange(256)))
    elif kind == "insert bytes":
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == "delete bytes":
        del out[at:at + rng.randint(1, 8)]
    elif kind == "truncate":
        del out[at:]
    elif kind == "header length":
        claimed = rng.choice((0, 1, len(data), 1 << 40, (1 << 64) - 1, max(0, header_end - 8 + rng.randint(-4, 4))))
        out[:8] = claimed.to_bytes(8, "little")
    elif kind == "manifest edit":  # change one number in a format-3 manifest to an extreme
        found = manifest_text(data)
        if found is not None:
            text, _ = found
            digits = [i for i, c in enumerate(text) if c.isdigit()]
            if digits:
                i = rng.choice(digits)
                replacement = rng.choice(("0", "9999999999", "-1", "2147483648", "1e308", "3"))
                out = bytearray(_with_manifest(data, text[:i] + replacement + text[i + 1:], found[1]))
    elif kind == "forge":
        found = manifest_text(data)
        if found is not None:
            out = bytearray(_with_manifest(data, forge(found[0], rng), found[1]))
    elif rng.random() < 0.25 and b'"netshrink":"' in data[8:header_end]:  # json edit of the format version
        header = bytes(data[8:header_end])
        at = header.index(b'"netshrink":"') + len(b'"netshrink":"')
        end = header.index(b'"', at)
        version = rng.choice(("\u00b2", "9" * 5000, "05", "-5", "5 ", "", "\u0665")).encode()
        header = header[:at] + version + header[end:]
        out = bytearray(len(header).to_bytes(8, "little") + header + data[header_end:])
    else:  # json edit: change one number in the header to an extreme
        header = bytes(out[8:header_end])
        digits = [i for i, c in enumerate(header) if chr(c).isdigit()]
        if digits:
            i = 8 + rng.choice(digits)
            replacement = rng.choice((b"0", b"9999999999", b"-1", b"2147483648", b"1e308", b"3"))
            out[i:i + 1] = replacement
    return kind, bytes(out)


def forge(text: str, rng: random.Random) -> str:
    """One forger's edit of a manifest's JSON text (see ``NUMBERS``, ``CODE_FIELDS``, ``SHAPES``)."""
    edit = rng.choice(("number", "number", "shape", "shape", "code", "labels", "entry"))
    if edit == "number":  # a whole number (a size, a count, a bit width, a payload length)
        spans = [m.span() for m in re.finditer(r"(?<=[:\[,])-?\d+(?=[,\]}])", text)]
        if spans:
            start, end = rng.choice(spans)
            return text[:start] + rng.choice(NUMBERS) + text[end:]
    elif edit == "shape":  # a tensor entry's shape: ["name",[shape],length...]
        spans = [m.span(1) for m in re.finditer(r'\["[^"]+",(\[[\d,]*\])', text)]
        if spans:
            start, end = rng.choice(spans)
            dims = [int(d) for d in text[start + 1:end - 1].split(",") if d]
            choices = list(SHAPES) + ([str([dims[0] * 2] + dims[1:]).replace(" ", ""),
                                       str([max(0, dims[0] - 1)] + dims[1:]).replace(" ", ""),
                                       str(dims[::-1]).replace(" ", "")] if dims else [])
            return text[:start] + rng.choice(choices) + text[end:]
    elif edit == "code" and '"config":{' in text:
        at = text.index('"config":{') + len('"config":{')
        return text[:at] + rng.choice(CODE_FIELDS) + text[at:]
    elif edit == "labels" and '"id2label":{' in text:
        at = text.index('"id2label":{') + len('"id2label":{')
        return text[:at] + ",".join(f'"{i}":"L"' for i in range(1000, 1000 + rng.choice((100, 70000)))) + "," + text[at:]
    elif edit == "entry":  # a field a writer never puts there
        field = rng.choice(('"nonfinite":["nothing"],', '"nonfinite":[],', '"linear_from_conv1d":["fc1"],',
                            '"activation_quantizers":{"":8},', '"transforms":{"":[{"kind":"mask"}]},'))
        return "{" + field + text[1:]
    return text


def fingerprint(state: dict) -> str:
    """A digest of a state dict's names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
