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

from .artifact import (BLOB, DIGEST_BYTES, DIGEST_KEY, _blob_offset, _digest_marker, _file_digest, _header, assemble,
                       blob_digest, manifest_section)

KINDS = ("flip bit", "set byte", "insert bytes", "delete bytes", "truncate", "header length", "json edit",
         "manifest edit")


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
    else:  # json edit: change one number in the header to an extreme
        header = bytes(out[8:header_end])
        digits = [i for i, c in enumerate(header) if chr(c).isdigit()]
        if digits:
            i = 8 + rng.choice(digits)
            replacement = rng.choice((b"0", b"9999999999", b"-1", b"2147483648", b"1e308", b"3"))
            out[i:i + 1] = replacement
    return kind, bytes(out)


def fingerprint(state: dict) -> str:
    """A digest of a state dict's names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
