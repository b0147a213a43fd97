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

from .artifact import DIGEST_KEY, _digest_marker, _file_digest, _header

KINDS = ("flip bit", "set byte", "insert bytes", "delete bytes", "truncate", "header length", "json edit")


def reseal(data: bytes) -> bytes:
    """``data`` with its whole-file checksum recomputed (unchanged if the header is unreadable)."""
    try:
        digest = _header(data, "file").get("__metadata__", {}).get(DIGEST_KEY)
    except Exception:  # noqa: BLE001 - an unreadable header is simply left as it is
        return data
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
