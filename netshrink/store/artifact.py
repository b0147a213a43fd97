"""One compressed file per model: a safetensors file holding one ``uint8`` blob (format 6; format 5
is the same layout without one-scale grids, formats 3 and 4 without tensors in bands, and format 3
without packed ones; they load).

* The blob (see :func:`to_bytes`): a SHA-256 of the whole file, the manifest (compressed JSON),
  then each tensor's payload; float32 tensors are coded exactly by ``codec.weights``.
* The manifest holds the model spec (zoo models are rebuilt from it), the recipe that produced
  the file, the activation quantizers, the weight transforms of each layer (masks, grids,
  codebooks, clips: so a loaded model keeps its compression through fine-tuning), and per tensor
  its name, shape and payload size; the format version is the safetensors metadata ``netshrink``.
* Zoo models and Hugging Face transformers models (class name and config recorded; rebuilt only
  from the installed library's own classes, never remote code, never a Hub kernel, offline) load
  without being passed in.
* **A file cannot lie.** The SHA-256 covers every byte (header, manifest, payloads), so any change
  is caught before anything is decoded. A checksum is no signature (a forger recomputes it), so
  behind it every claim is checked before it costs anything: the manifest is bounded by
  ``MAX_MANIFEST``, each payload by the file, each stream's work by what an encoder writes; models
  are built on PyTorch's ``meta`` device only, and every stored tensor's shape is checked against
  the module that will hold it (no wider than the model's) before its payload is decoded; the
  model that loads must run (:func:`_check_runs`), with inf or NaN only where it was saved.
* Loading reads the file twice, a piece at a time (the checksum, then each tensor's payload as it
  is decoded), so it holds the model and one tensor's work, never the file.
* Loading never unpickles; only :class:`NetshrinkError` leaves :func:`load`; a failed load into a
  caller's model leaves it exactly as it was.
* Writes are atomic (``files.atomic_write``). Formats 1 and 2 (a safetensors tensor per stored
  tensor, the manifest in the metadata; format 2 with a whole-file checksum there) still load.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch
from safetensors.numpy import load as st_load
from torch import nn
from torch.nn.utils import parametrize

from .codec import format2 as format2_codec
from .codec import weights as codec
from ..grids import round_within
from .codec.streams import Reader, write_varint
from ..errors import NetshrinkError, first_line
from ..files import atomic_write, open_regular
from ..compress.methods import TRANSFORMS
from ..compress.methods.activations import ActivationQuantizer, attach, detach_all, input_quantizer
from ..compress.methods.conv1d import LinearFromConv1D, as_linear, is_conv1d
from ..compress.methods.grid import expand, last_fixed_grid
from ..compress.methods.heads import check_bias_heads, restore_bias_heads, sync_attention
from ..compress.methods.prune import Mask
from ..compress.methods.base import (COMPRESSIBLE, LINEAR_CONV, baked_items, baked_name, baked_state_dict, is_depthwise, remove_transforms, sync_sizes, transforms)
from ..errors import check_flag, preserved
from ..training import distributed
from ..zoo.models import model_from_spec, spec_of

FORMAT, VERSION, READS = "netshrink", 6, (1, 2, 3, 4, 5, 6)
KEY, DIGEST_KEY = "netshrink", "netshrink-sha256"
_ZEROS = "0" * 64
MAX_HEADER = 1 << 28  # 256 MiB: a safetensors header (formats 1-2) is read from the file, bounded by it too
# A manifest inflates from a few bytes of deflate: its JSON is bounded far below what parsing could
# cost (a model of 100,000 tensors records about 10 MiB), so a forged one cannot spend seconds or GiBs.
MAX_MANIFEST = 1 << 25
GIVE_BACK_EVERY = 1 << 25  # see _GiveBack
HASH_CHUNK = 1 << 24  # bytes hashed (and, loading from a file, read) at a time
SPOOL_MEMORY = 1 << 23  # payloads kept in memory while saving; beyond this they wait in a temporary file
MAX_DIMS = 8
BLOB = "netshrink"  # format 3: the one safetensors tensor, a uint8 blob
DIGEST_BYTES = 32
# Format 3 compresses its manifest with this preset dictionary (zlib's zdict): the words every
# manifest repeats, so a small model's manifest costs its own names and numbers, not the
# vocabulary. Part of the format: never change it (a new dictionary needs a new version).
MANIFEST_WORDS = (b'"transforms":{"kind":"fixed-grid","bits":4,"scheme":"symmetric","group_size":null,"label":"gptq"}'
                  b'{"kind":"learned-step","per_channel":true}{"kind":"quantize","bits":8,"scheme":"affine"}'
                  b'{"kind":"clip","threshold":,"value":}"activation_quantizers":{"recipe":[{"prune":{"keep":'
                  b'"share":{"bits":"finetune":{"epochs":,"lr":"info":{".parametrizations.weight.0.scale"'
                  b'"dtype":"<i8"},"same_as":"grid":0}]"in_shape":[1,28,28],"classes":10},"tensors":[["'
                  b'.weight",[.bias",[.running_mean",[.running_var",[.num_batches_tracked",[],8,{"dtype":"<i8"}]'
                  b'{"kind":"codebook"}{"kind":"mask","label":"prune"}{"model":{"name":"lenet-300-100"')
STATE_KEY = ".parametrizations.weight."  # transform tensors: <layer>.parametrizations.weight.<i>.<name>


def restore_transforms(model: nn.Module, records: dict[str, list[dict]],
                       state: dict[str, dict[int, dict[str, torch.Tensor]]] | None = None) -> None:
    """Rebuild the weight transforms a file recorded (``transform_records``), in their
    order, from the weights as loaded: each transform's ``from_record`` reads what it needs (the
    zeros of a mask, the values of a codebook) off the stored weight, which is already the
    transformed one, so the model computes exactly what was saved."""
    modules = dict(model.named_modules())
    planned = []
    for layer, stack in records.items():
        module = modules.get(layer)
        if not isinstance(module, COMPRESSIBLE):
            raise NetshrinkError(f"the file records weight transforms for {layer!r}, which is not a Linear/Conv "
                                 "layer of this model")
        weight = module.weight.detach()
        for i, record in enumerate(stack):
            try:
                carried = (state or {}).get(layer, {}).get(i)
                kind = TRANSFORMS[record["kind"]]
                transform = kind.from_record(record, weight, carried) if carried else kind.from_record(record, weight)
                planned.append((module, transform))
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, NetshrinkError):
                    raise
                raise NetshrinkError(f"bad weight transform record for {layer!r}: {record!r}") from None
    for module, transform in planned:
        with torch.no_grad():  # registering runs the transform once, as a check: no training step
            parametrize.register_parametrization(module, "weight", transform)


def _libc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        return None


_TRIM = _libc_trim()


class _GiveBack:
    """Returns the memory of freed temporaries to the system once every ``GIVE_BACK_EVERY`` bytes
    of tensors handled. glibc keeps freed blocks of a few megabytes in the process (its mmap
    threshold rises after the first such block is freed), so coding one large tensor after another
    grew saving's resident size by about twice what it needed (in a manual check on a 20M-parameter
    8-bit model); one call costs about 2 ms, which is why it is not made after every tensor."""

    def __init__(self) -> None:
        self.pending = 0

    def after(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= GIVE_BACK_EVERY and _TRIM is not None:
            _TRIM(0)
            self.pending = 0


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def stored_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The arrays a file stores for ``model``: its baked state, with -0.0 as +0.0 (they compare
    equal and compute identically, but the sign bit would make the codec store it as a non-zero;
    masks written as w * mask leave many of them)."""
    return dict(stored_items(model))


def stored_items(model: nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`stored_arrays` one at a time (each computed when its turn comes)."""
    for name, tensor in baked_items(model):
        array = tensor.detach().cpu().numpy()
        if array.dtype == np.float32 and (array.view(np.uint32) == 0x80000000).any():  # copied only then
            array = np.where(array == 0, np.float32(0), array)  # float32 already: one new array
        yield name, array
        del tensor, array  # let go before the next is computed


def transform_records(model: nn.Module) -> tuple[dict[str, list[dict]], dict[str, np.ndarray]]:
    """Per layer, the weight transforms a file records so that loading can rebuild them, and the
    tensors some of them carry (a fixed grid's scales), keyed
    ``<layer>.parametrizations.weight.<position in the record list>.<name>``."""
    records, arrays = {}, {}
    for name, layer in model.named_modules():
        stack = [t for t in transforms(layer) if type(t) in TRANSFORMS.values()]
        if stack:
            records[name] = [t.record() for t in stack]
        for i, transform in enumerate(stack):
            for key, tensor in (transform.state() if hasattr(transform, "state") else {}).items():
                arrays[f"{name}{STATE_KEY}{i}.{key}"] = tensor.detach().cpu().float().numpy()
    return records, arrays


def fixed_grids(model: nn.Module) -> dict[str, tuple[int, Any]]:
    """Weights whose last transform is a fixed grid are stored as their integer codes (as float32,
    which the codec packs into a few bits each), not their values: a grouped grid has a different
    scale per group, so its values are many more distinct numbers than its codes. Returns
    ``{weight key: (position of the grid in the record list, the grid)}``; see :func:`grid_codes`."""
    found = {}
    for name, layer in model.named_modules():
        grid = last_fixed_grid(layer)
        if grid is not None:
            recorded = [t for t in transforms(layer) if type(t) in TRANSFORMS.values()]
            found[f"{name}.weight" if name else "weight"] = (len(recorded) - 1, grid)
    return found


def grid_codes(array: np.ndarray, grid) -> np.ndarray:
    """The integer codes (float32) of a baked weight on its fixed grid; the values are ``codes *
    scale`` again on load, bit for bit (the grid's own last two steps)."""
    weight = torch.from_numpy(array)
    codes = weight / expand(grid.scale, weight, grid.group_size)  # one temporary, rounded in place
    codes.round_()
    codes += 0.0  # -0.0 as +0.0
    return codes.numpy()


def _values_from_codes(manifest: dict, state: dict[str, torch.Tensor],
                       transform_state: dict[str, dict[int, dict[str, torch.Tensor]]], source: str) -> None:
    for key, entry in manifest["tensors"].items():
        if "grid" not in entry:
            continue
        layer, position = key.rpartition(".")[0], entry["grid"]
        records = manifest.get("transforms", {}).get(layer, [])
        if not (type(position) is int and 0 <= position < len(records) and records[position]["kind"] == "fixed-grid"):
            raise _corrupt(source, f"tensor {key!r} names no grid")
        carried = transform_state.get(layer, {}).get(position)
        scale = carried.get("scale") if carried else None
        codes = state[key]
        if not (torch.is_tensor(scale) and codes.dim() >= 1 and scale.dim() == 2 and scale.shape[0] == codes.shape[0]):
            raise _corrupt(source, f"tensor {key!r} has no grid to decode its codes")
        group_size = records[position].get("group_size")
        inputs = codes[0].numel()
        if not (group_size is None or isinstance(group_size, int) and group_size > 0) \
                or scale.shape[1] != -(-inputs // (group_size or inputs)):
            raise _corrupt(source, f"tensor {key!r}: its grid does not match its shape")
        state[key] = codes * expand(scale, codes, group_size)


def _split_transform_state(state: dict[str, torch.Tensor]) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """Take the transform tensors out of a decoded state: ``{layer: {position: {name: tensor}}}``."""
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in state if STATE_KEY in k]:
        layer, _, rest = key.partition(STATE_KEY)
        position, _, name = rest.partition(".")
        if not position.isdigit() or not name:
            raise NetshrinkError(f"bad transform tensor name {key!r} (corrupt file)")
        found.setdefault(layer, {}).setdefault(int(position), {})[name] = state.pop(key)
    return found


def _digest_marker(digest: str) -> bytes:
    return f'"{DIGEST_KEY}":"{digest}"'.encode()


def _file_digest(data: bytes, at: int, length: int) -> str:
    """SHA-256 of ``data`` with the digest field at ``at`` (``length`` bytes) zeroed."""
    view = memoryview(data)
    h = hashlib.sha256(view[:at])
    h.update(_digest_marker(_ZEROS))
    h.update(view[at + length:])
    return h.hexdigest()


def to_bytes(model: nn.Module, *, recipe: list | None = None, info: dict | None = None,
             max_error: float | None = None) -> bytes:
    """The bytes :func:`save` writes for ``model`` (see :func:`write_model`)."""
    check_max_error(max_error)
    check_notes(recipe, info)
    buffer = io.BytesIO()
    write_model(buffer, model, recipe=recipe, info=info, max_error=max_error)
    return buffer.getvalue()


def write_model(out: BinaryIO, model: nn.Module, *, recipe: list | None = None, info: dict | None = None,
                max_error: float | None = None) -> int:
    """Serialise ``model`` into the seekable binary file ``out`` (its transforms baked into a copy;
    the model itself is not changed); returns the byte count.

    Format 6: a safetensors file holding one ``uint8`` tensor, ``netshrink``, whose bytes are::

        32 bytes  SHA-256 of the whole file, computed with these 32 bytes zeroed
        varint    manifest length | the manifest: JSON, raw-deflate compressed
        payloads  each tensor's bytes in manifest order (``codec.weights`` for float32 tensors,
                  little-endian raw bytes for others)

    The manifest lists tensors as ``[name, shape, payload bytes, extras]`` (extras: ``dtype``
    when not float32, ``grid`` for weights stored as grid codes, ``same_as`` for a tensor stored
    once under another name) and omits empty fields; so a small model's whole overhead, header
    included, is a few hundred bytes.

    ``max_error`` (near-lossless, only when asked): each parameter is stored either exactly or
    rounded onto a uniform grid with every value within ``max_error`` (``netshrink.grids.round_within``),
    whichever payload is smaller; buffers (BatchNorm statistics, quantizer ranges) stay exact."""
    quantizers = {name: m.input_quantizer.bits for name, m in model.named_modules()
                  if isinstance(input_quantizer(m), ActivationQuantizer)}
    for module in model.modules():  # masks' float copies serve training steps: saving lets them go first
        if isinstance(module, Mask):
            module.release()
    records, transform_arrays = transform_records(model)
    grids = fixed_grids(model)
    table = []
    # One array at a time (baked, coded, written to a spool, let go): saving holds the model and
    # one array's work (payloads beyond SPOOL_MEMORY bytes wait on disk until the manifest, which
    # precedes them, is known). Identical arrays have identical payloads (coding is exact), so tied
    # weights (an embedding shared with an output layer) and identical tensors are found by their
    # payload's hash and stored once; the manifest points the others at that copy.
    payloads = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
    seen: dict[tuple, str] = {}
    give_back = _GiveBack()
    parameters = _roundable(model) if max_error else set()
    nonfinite: list[str] = []
    for name, array in itertools.chain(stored_items(model), transform_arrays.items()):
        extras: dict[str, Any] = {}
        if name in grids:
            extras["grid"], grid = grids[name]
            array = grid_codes(array, grid)
        if array.dtype.kind == "f" and not np.isfinite(array).all():  # loading refuses inf/NaN anywhere else
            nonfinite.append(name)
        if array.dtype == np.float32 and name in parameters:  # never a grid's codes: those layers have transforms
            array, parts = _within(array, max_error)
        elif array.dtype == np.float32:
            parts = codec.encode_parts(array)  # a large tensor's bands are written as they are coded
        else:
            extras["dtype"] = array.dtype.newbyteorder("<").str
            parts = iter([np.ascontiguousarray(array, dtype=extras["dtype"]).tobytes()])
        start, digest = payloads.tell(), hashlib.sha256()
        for part in parts:
            payloads.write(part)
            digest.update(part)
        key = (digest.digest(), array.dtype.str, array.shape)
        if key in seen:  # written once already: this copy goes
            payloads.seek(start)
            payloads.truncate()
            table.append([name, list(array.shape), 0, {**extras, "same_as": seen[key]}])
            continue
        seen[key] = name
        table.append([name, list(array.shape), payloads.tell() - start] + ([extras] if extras else []))
        give_back.after(array.nbytes)
    manifest = {"model": spec_of(model), "tensors": table}
    converted = [name for name, module in model.named_modules() if isinstance(module, LinearFromConv1D)]
    manifest.update({key: value for key, value in (("recipe", recipe), ("activation_quantizers", quantizers),
                                                   ("transforms", records), ("info", info),
                                                   ("linear_from_conv1d", converted), ("nonfinite", nonfinite)) if value})
    with payloads:
        return write_file(out, json.dumps(manifest, separators=(",", ":")), payloads)


def assemble(manifest: str, payloads: list[bytes]) -> bytes:
    """A format-5 file's bytes from its manifest text and tensor payloads, checksum set."""
    buffer = io.BytesIO()
    write_file(buffer, manifest, io.BytesIO(b"".join(payloads)))
    return buffer.getvalue()


def write_file(out: BinaryIO, manifest: str, payloads: BinaryIO) -> int:
    """Write a format-5 file (manifest text, then the tensor payloads, read from the binary file
    ``payloads``) into the seekable binary file ``out`` and set its checksum; returns the byte
    count. The bytes are hashed as they are written, so the file is
    never held in memory. The safetensors header is the one safetensors' writer produces for a
    single uint8 tensor (a test compares them); that writer needs the whole blob in memory."""
    payload_bytes = payloads.seek(0, io.SEEK_END)
    payloads.seek(0)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=MANIFEST_WORDS)
    packed = packer.compress(manifest.encode()) + packer.flush()
    head = io.BytesIO()
    head.write(bytes(DIGEST_BYTES))
    write_varint(head, len(packed))
    head.write(packed)
    size = head.tell() + payload_bytes
    header = json.dumps({"__metadata__": {KEY: str(VERSION)}, BLOB: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    digest, start = hashlib.sha256(), out.tell()

    def put(chunk: bytes) -> None:
        out.write(chunk)
        digest.update(chunk)  # the digest's own bytes are zeros here, as the checksum is defined

    put(len(header).to_bytes(8, "little") + header)
    put(head.getvalue())
    for chunk in iter(lambda: payloads.read(1 << 24), b""):
        put(chunk)
    end = out.tell()
    out.seek(start + 8 + len(header))
    out.write(digest.digest())
    out.seek(end)
    return end - start


class FileBytes:
    """A file's bytes, read when sliced: loading holds the manifest and one tensor's payload at a
    time, never the whole file. Slices past the end come back short, as bytes' do."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        self.file, self.source = file, source
        self.stat = os.fstat(file.fileno())
        self.size = self.stat.st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, where: slice) -> bytes:
        start, stop, _ = where.indices(self.size)
        try:
            self.file.seek(start)
            return self.file.read(max(0, stop - start))
        except OSError as exc:
            raise NetshrinkError(f"cannot read {self.source}: {exc.strerror or exc}") from None

    def exactly(self, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``, which the file had when its size was read."""
        chunk = self[start:start + length]
        if len(chunk) != length:
            raise self._changed()
        return chunk

    def check_unchanged(self) -> None:
        """Raise if the file was written to since it was opened (its checksum was verified in a
        first pass; the tensors are read in a second)."""
        now = os.fstat(self.file.fileno())
        if (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            raise self._changed()

    def _changed(self) -> NetshrinkError:
        return NetshrinkError(f"{self.source} changed while it was read")


class _Payload:
    """A tensor's coded bytes in a :class:`FileBytes`, read when the tensor is decoded; described
    like the uint8 array they become, for the manifest checks."""

    dtype, ndim = np.dtype(np.uint8), 1

    def __init__(self, data: FileBytes, start: int, length: int) -> None:
        self.data, self.start, self.shape, self.nbytes = data, start, (length,), length

    def read(self) -> np.ndarray:
        return np.frombuffer(self.data.exactly(self.start, self.nbytes), dtype=np.uint8)


def _bytes_at(data, start: int, stop: int):
    """``data[start:stop]`` without copying bytes in memory (read from disk for a :class:`FileBytes`)."""
    return data[start:stop] if isinstance(data, FileBytes) else memoryview(data)[start:stop]


def _blob_offset(data) -> int:
    """Where the blob's bytes start: after the 8-byte header size and the header."""
    return 8 + int.from_bytes(data[:8], "little")


def blob_digest(data) -> bytes:
    """A format-3 file's SHA-256: every byte, with the digest's own 32 bytes read as zeros (hashed
    in place, a piece at a time, without copying the file)."""
    at = _blob_offset(data)
    digest = hashlib.sha256(_bytes_at(data, 0, at))
    digest.update(bytes(DIGEST_BYTES))
    for start in range(at + DIGEST_BYTES, len(data), HASH_CHUNK):
        digest.update(_bytes_at(data, start, start + HASH_CHUNK))
    return digest.digest()


def manifest_section(data, source: str = "file") -> tuple[bytes, int]:
    """A format-3 file's manifest (JSON bytes, at most ``MAX_MANIFEST``) and where its first payload
    starts."""
    start = _blob_offset(data) + DIGEST_BYTES
    try:
        reader = Reader(_bytes_at(data, start, start + 10))  # the manifest's length (a varint)
        length = reader.varint()
        start += reader.pos
        packed = bytes(_bytes_at(data, start, start + length))
        unpacker = zlib.decompressobj(-15, zdict=MANIFEST_WORDS)
        text = unpacker.decompress(packed, MAX_MANIFEST)
        if len(packed) != length or unpacker.unconsumed_tail or not unpacker.eof:
            raise _corrupt(source, "manifest too large or cut short")
    except (zlib.error, NetshrinkError):
        raise _corrupt(source, "manifest is not compressed JSON") from None
    return text, start + length


def save(model: nn.Module, path: str | os.PathLike, *, recipe: list | None = None,
         info: dict | None = None, max_error: float | None = None) -> int:
    """Write ``model`` to ``path`` atomically; returns the file's size in bytes.

    Exact by default: loading gives back every value bit for bit. ``max_error`` asks for a
    near-lossless file: each parameter (weights, biases, BatchNorm scales and shifts, embeddings)
    is stored exactly or within ``max_error`` of its value, whichever is smaller on disk, like an
    NNR codec's quantization parameter but with the bound guaranteed; buffers stay exact. The
    model in memory is unchanged: load the file to use what it holds.

    >>> from netshrink.zoo.models import build_model
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.nsk")
    >>> 300_000 < save(build_model("mlp"), path) < 4 * 101_770  # dense floats: sign and exponent coded
    True
    """
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    check_max_error(max_error)
    check_notes(recipe, info)
    def write() -> int:
        return atomic_write(path, lambda out: write_model(out, model, recipe=recipe, info=info, max_error=max_error))

    # Several processes hold the same model: the first writes, the others learn its size.
    size = distributed.first_process(write, str(path))
    return distributed.broadcast_number(size if size is not None else -1)


def check_notes(recipe: list | None, info: dict | None) -> None:
    """What a file records beside the weights is JSON: ``recipe`` a list, ``info`` a dict, of
    strings, finite numbers, booleans, None, lists and dicts (NaN is not JSON; loading refuses it)."""
    for label, value, kind in (("recipe", recipe, list), ("info", info, dict)):
        if value is None:
            continue
        if not isinstance(value, kind):
            raise NetshrinkError(f"{label} must be a {kind.__name__} or None. Received: {label}={str(value)[:80]}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise NetshrinkError(f"{label} must hold only strings, finite numbers, booleans, None, lists and dicts "
                                 f"({first_line(exc)}). Received: {label}={str(value)[:80]}") from None


def check_max_error(max_error) -> None:
    """A near-lossless bound is None (exact) or a positive finite number."""
    if max_error is not None and (isinstance(max_error, bool) or not isinstance(max_error, (int, float))
                                  or not math.isfinite(max_error) or max_error <= 0):
        raise NetshrinkError(f"max_error must be a positive number (the largest change of a stored value), or None "
                             f"for an exact file. Received: max_error={max_error!r}")


def _roundable(model: nn.Module) -> set[str]:
    """The parameters a near-lossless file may round: plain ones, and weights whose only
    transforms are masks (zeros stay zero). A quantizer or codebook is applied again on loading:
    rounding its input could move a value to another code, so those weights stay exact; so do an
    activation quantizer's learned ranges (a step of 0.01 is not a value to move by 1e-3)."""
    names = set()
    for key, _ in model.named_parameters():
        name = baked_name(key)
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(owner, ActivationQuantizer):
            continue
        if name == key or (key.endswith(".original") and all(isinstance(t, Mask) for t in transforms(owner))):
            names.add(name)
    return names


def _within(array: np.ndarray, max_error: float) -> tuple[np.ndarray, list[bytes]]:
    """(the values stored, their payload): ``array`` exactly or rounded within ``max_error``,
    whichever codes smaller. Both payloads are held at once (not streamed band by band): the
    near-lossless option costs a tensor's payload more memory and twice the coding time."""
    exact = codec.encode(array)
    found = round_within(array, max_error)
    if found is not None:
        rounded, step = found
        near = codec.encode(rounded, step=step)
        if len(near) < len(exact):
            return rounded, [near]
    return array, [exact]


def _corrupt(source: str, what: str) -> NetshrinkError:
    return NetshrinkError(f"{source} is corrupt or not a netshrink file ({what})")


def _header(data: bytes, source: str) -> dict:
    if len(data) < 8:
        raise _corrupt(source, f"{len(data)} bytes")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8 or size > MAX_HEADER:
        raise _corrupt(source, "header size beyond the end of the file")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _corrupt(source, "header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise _corrupt(source, "header is not a safetensors header")
    return header


def _verify_digest(data: bytes, metadata: dict, source: str) -> None:
    digest = metadata.get(DIGEST_KEY)
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise _corrupt(source, "its checksum is missing")
    marker = _digest_marker(digest)
    header_end = 8 + int.from_bytes(data[:8], "little")
    at = data.find(marker, 8, header_end)
    if at < 0 or data.find(marker, at + 1, header_end) >= 0:
        raise _corrupt(source, "its checksum field is damaged")
    if _file_digest(data, at, len(marker)) != digest:
        raise NetshrinkError(f"{source} fails its checksum: the file was damaged or changed after it was written")


def _memory_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _check_manifest(manifest: Any, stored: dict[str, np.ndarray], source: str) -> None:
    """Every field of the manifest has the type and range it must have, and agrees with the
    stored tensors, before anything is decoded or allocated."""
    if not isinstance(manifest.get("tensors"), dict):
        raise _corrupt(source, "manifest has no tensor table")
    tensors = manifest["tensors"]
    copies = {name for name, entry in tensors.items() if isinstance(entry, dict) and "same_as" in entry}
    if set(tensors) - copies != set(stored):
        raise _corrupt(source, "manifest and stored tensors differ")
    total = 0
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (_is_shape(shape) and isinstance(entry.get("sha", ""), str)):
            raise _corrupt(source, f"bad entry for tensor {name!r}")
        if name in copies:
            original = tensors.get(entry["same_as"]) if isinstance(entry["same_as"], str) else None
            if entry["same_as"] in copies or not isinstance(original, dict) or original.get("shape") != shape:
                raise _corrupt(source, f"bad reference for tensor {name!r}")
            continue
        array = stored[name]
        if "enc" in entry:
            if entry["enc"] not in ("weights", *format2_codec.NAMES.values()) or array.dtype != np.uint8 or array.ndim != 1:
                raise _corrupt(source, f"bad encoding for tensor {name!r}")
            total += 4 * math.prod(shape)
        else:
            if list(array.shape) != shape:
                raise _corrupt(source, f"tensor {name!r} has shape {list(array.shape)}, the manifest says {shape}")
            total += array.nbytes
    if total > _memory_limit():
        raise NetshrinkError(f"{source} claims {total / 2**30:.1f} GiB of tensors, more than this machine's memory")
    quantizers = manifest.get("activation_quantizers", {})
    if not (isinstance(quantizers, dict) and all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8
                                                 for b in quantizers.values())):
        raise _corrupt(source, "bad activation quantizers")
    records = manifest.get("transforms", {})
    if not (isinstance(records, dict) and all(
            isinstance(stack, list) and all(isinstance(r, dict) and r.get("kind") in TRANSFORMS for r in stack)
            for stack in records.values())):
        raise _corrupt(source, "bad transform records")
    if not isinstance(manifest.get("recipe", []), list) or not isinstance(manifest.get("info", {}), dict):
        raise _corrupt(source, "bad recipe or info")
    if manifest.get("model") is not None and not isinstance(manifest["model"], dict):
        raise _corrupt(source, "bad model spec")
    converted = manifest.get("linear_from_conv1d", [])
    if not (isinstance(converted, list) and all(isinstance(name, str) and name for name in converted)):
        raise _corrupt(source, "bad list of Conv1D layers stored as Linear")
    nonfinite = manifest.get("nonfinite", [])
    if not (isinstance(nonfinite, list) and all(isinstance(name, str) and name in tensors for name in nonfinite)):
        raise _corrupt(source, "bad list of tensors saved with inf or NaN")


def _is_shape(shape: Any) -> bool:
    """A list of at most ``MAX_DIMS`` non-negative ints (not bools), each below 2**40."""
    return (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < 1 << 40 for d in shape))


def read_manifest(data: bytes, source: str = "file", *, allow_unchecked: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """The checked manifest and the stored (still encoded) arrays of a file's bytes."""
    header = _header(data, source)
    metadata = header.get("__metadata__", {})
    if KEY not in metadata:
        raise NetshrinkError(f"{source} is a safetensors file but not a netshrink file")
    version = metadata[KEY]
    if isinstance(version, str) and version.isdigit():  # formats 3-5: the version is all the field says
        if not (version.isascii() and len(version) <= 4):
            raise _corrupt(source, f"format version {version[:20]!r}")
        manifest, stored = _read_format3(data, header, int(version), source)
    else:  # formats 1 and 2 (small files of the first versions) are read whole
        manifest, stored = _read_format2(data[:] if isinstance(data, FileBytes) else data, metadata, source,
                                         allow_unchecked)
    _check_manifest(manifest, stored, source)
    return manifest, stored


def _read_format2(data: bytes, metadata: dict, source: str, allow_unchecked: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """Formats 1 and 2: the manifest in the metadata, one safetensors tensor per stored tensor."""
    if DIGEST_KEY in metadata:
        _verify_digest(data, metadata, source)
    elif not allow_unchecked:
        raise NetshrinkError(f"{source} is a format-1 file (netshrink 0.1), which has no checksum: an edit to it "
                             "cannot be detected. If you trust it, load it with allow_unchecked=True and save it again")
    try:
        manifest = json.loads(metadata[KEY])
    except (ValueError, TypeError, RecursionError):
        raise _corrupt(source, "manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NetshrinkError(f"{source} is a safetensors file but not a netshrink file")
    if manifest.get("version") not in (1, 2):
        raise _corrupt(source, f"format version {manifest.get('version')!r} in a format-2 layout")
    if manifest["version"] >= 2 and DIGEST_KEY not in metadata:
        raise _corrupt(source, "its checksum is missing")
    try:
        stored = st_load(bytes(data))
    except Exception as exc:  # safetensors raises several types for inconsistent headers
        raise _corrupt(source, f"{type(exc).__name__}: {first_line(exc)}") from None
    return manifest, stored


def _read_format3(data: bytes, header: dict, version: int, source: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Format 3: one uint8 blob (see :func:`to_bytes`); returns the manifest with its tensor table
    as ``{name: entry}`` and each stored tensor's payload (float32: still encoded)."""
    if version not in READS:
        raise NetshrinkError(f"{source} has format version {version}; this netshrink reads "
                             f"{', '.join(map(str, READS))}")
    at = _blob_offset(data)
    blob = header.get(BLOB)
    size = len(data) - at
    if set(header) != {"__metadata__", BLOB} or not isinstance(blob, dict) or blob.get("dtype") != "U8" \
            or blob.get("shape") != [size] or blob.get("data_offsets") != [0, size] or size < DIGEST_BYTES:
        raise _corrupt(source, "unexpected safetensors layout")
    if blob_digest(data) != bytes(data[at:at + DIGEST_BYTES]):
        raise NetshrinkError(f"{source} fails its checksum: the file was damaged or changed after it was written")
    text, offset = manifest_section(data, source)
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _corrupt(source, "manifest is not compressed JSON") from None
    if not isinstance(manifest, dict):
        raise _corrupt(source, "manifest is not a JSON object")
    manifest.update(format=FORMAT, version=version)  # the header says both
    table = manifest.get("tensors")
    if not isinstance(table, list):
        raise _corrupt(source, "manifest has no tensor table")
    tensors, stored = {}, {}
    for row in table:
        if not (isinstance(row, list) and len(row) in (3, 4) and isinstance(row[0], str) and row[0] not in tensors
                and isinstance(row[2], int) and not isinstance(row[2], bool) and row[2] >= 0
                and (len(row) == 3 or isinstance(row[3], dict))):
            raise _corrupt(source, f"bad tensor entry {str(row)[:60]}")
        name, shape, length = row[:3]
        extras = dict(row[3]) if len(row) == 4 else {}
        entry = {"shape": shape, **{k: extras[k] for k in ("grid", "same_as") if k in extras}}
        tensors[name] = entry
        if "same_as" in entry:
            continue
        if length > len(data) - offset:
            raise _corrupt(source, f"tensor {name!r} is cut short")
        start, offset = offset, offset + length
        dtype = extras.get("dtype")
        if dtype is None:
            entry["enc"] = "weights"
            stored[name] = (_Payload(data, start, length) if isinstance(data, FileBytes)
                            else np.frombuffer(_bytes_at(data, start, offset), dtype=np.uint8))
            continue
        if not (isinstance(dtype, str) and len(dtype) == 3 and dtype[0] in "<|" and dtype[1] in "biuf" and dtype[2] in "1248"):
            raise _corrupt(source, f"bad dtype for tensor {name!r}")
        itemsize = np.dtype(dtype).itemsize
        if not _is_shape(shape) or length != itemsize * math.prod(shape):
            raise _corrupt(source, f"tensor {name!r} does not fill its shape")
        stored[name] = np.frombuffer(_bytes_at(data, start, offset), dtype=dtype).reshape(shape)
    if offset != len(data):
        raise _corrupt(source, "trailing bytes after the last tensor")
    manifest["tensors"] = tensors
    return manifest, stored


def _decode_all(manifest: dict, stored: dict[str, np.ndarray], source: str) -> dict[str, torch.Tensor]:
    state = {}
    give_back = _GiveBack()
    for name, entry in manifest["tensors"].items():
        if "same_as" in entry:
            continue
        shape = tuple(entry["shape"])
        array = stored[name]
        if "enc" in entry:
            try:
                coder = codec if entry["enc"] == "weights" else format2_codec
                array = coder.decode(memoryview(array.read() if isinstance(array, _Payload) else array), shape)
            except NetshrinkError as exc:
                raise NetshrinkError(f"{source}: tensor {name!r}: {exc}") from None
            except (ValueError, IndexError, OverflowError, MemoryError, AssertionError) as exc:
                # (constriction asserts on words no encoder could have written)
                raise _corrupt(source, f"tensor {name!r} does not decode: {type(exc).__name__}") from None
        if tuple(array.shape) != shape or ("sha" in entry and _digest(array) != entry["sha"]):
            raise NetshrinkError(f"{source}: tensor {name!r} fails its checksum (corrupt file)")
        state[name] = torch.from_numpy(array if array.flags.writeable else np.array(array))  # raw: read-only bytes
        give_back.after(array.nbytes)
    for name, entry in manifest["tensors"].items():
        if "same_as" in entry:
            state[name] = state[entry["same_as"]]
    return state


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], quantized: dict, source: str) -> None:
    """Raise, before the model changes, unless the file's tensors can be loaded into ``model``:
    the same names, and the same shapes except the sizes structured pruning changes."""
    modules = dict(model.named_modules())
    for layer in quantized:
        if not isinstance(layer, str) or layer not in modules:
            raise NetshrinkError(f"{source}: layer {layer!r} is not in the given model")
    expected = {k: v for k, v in baked_state_dict(model).items() if ".input_quantizer." not in f".{k}"}
    expected.update({f"{layer}.input_quantizer.{b}": torch.zeros(()) for layer in quantized for b in ("low", "high")})
    for layer in quantized:  # smoothing factors (SmoothQuant): one per input of a Linear
        if f"{layer}.input_quantizer.smooth" in state and isinstance(modules[layer], nn.Linear):
            expected[f"{layer}.input_quantizer.smooth"] = torch.zeros(modules[layer].in_features)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else [])
        raise NetshrinkError(f"{source} does not fit this model: {'; '.join(parts)}")
    for key, tensor in state.items():
        current = expected[key]
        if tensor.is_floating_point() != current.is_floating_point():
            raise NetshrinkError(f"{source}: tensor {key!r} is {tensor.dtype} in the file, {current.dtype} in the model")
        if tuple(tensor.shape) != tuple(current.shape):
            owner_name, _, attribute = key.rpartition(".")
            owner = modules.get(owner_name)
            # Structured pruning only removes units: a stored layer may be narrower than the
            # model's, never wider (so decoding it costs no more than the model holds).
            resizable = (isinstance(owner, (*LINEAR_CONV, nn.modules.batchnorm._BatchNorm))
                         and (getattr(owner, "groups", 1) == 1 or is_depthwise(owner) and tensor.shape[1:] == current.shape[1:])
                         and tensor.dim() == current.dim() and all(s <= c for s, c in zip(tensor.shape, current.shape))
                         and attribute in ("weight", "bias", "running_mean", "running_var"))
            if not resizable:
                raise NetshrinkError(f"{source} does not fit this model: {key} is {list(tensor.shape)} in the file, "
                                     f"{list(current.shape)} in the model")


def from_bytes(data: bytes | FileBytes, model: nn.Module | None = None, source: str = "file", *,
               restore: bool = True, allow_unchecked: bool = False) -> nn.Module:
    """Rebuild a model from bytes written by :func:`to_bytes` (see :func:`load`)."""
    if model is not None and not isinstance(model, nn.Module):
        raise NetshrinkError(f"model must be a torch.nn.Module. Received: {type(model).__name__}")
    try:
        return _from_bytes(data, model, source, restore, allow_unchecked)
    except MemoryError:  # its message may be empty: say what happened, in one line
        raise NetshrinkError(f"{source}: not enough memory to load it") from None


def _from_bytes(data: bytes | FileBytes, model: nn.Module | None, source: str, restore: bool,
                allow_unchecked: bool) -> nn.Module:
    manifest, stored = read_manifest(data, source, allow_unchecked=allow_unchecked)
    quantized = manifest.get("activation_quantizers", {})
    placeholders = _placeholders(manifest, stored)
    rebuilt = model is None
    if rebuilt:
        if not manifest.get("model"):
            raise NetshrinkError(f"{source} holds a model netshrink cannot rebuild by itself; "
                                 "pass model=<an instance of the same architecture>")
        largest = max((d for entry in manifest["tensors"].values() for d in entry["shape"]), default=1)
        with torch.device("meta"):  # shapes only: the stored tensors become its weights, nothing else is allocated
            model = model_from_spec(manifest["model"], largest, len(manifest["tensors"]))
    converted = manifest.get("linear_from_conv1d", [])
    # Everything below restores the structure on failure, the file's form (Conv1D layers as
    # Linear, kept-head buffers) included: a model handed in that the file does not fit is left as it was.
    with preserved(model):
        _as_stored(model, converted, placeholders, source)
        _check_fits(model, {k: v for k, v in placeholders.items() if STATE_KEY not in k}, quantized, source)
        _check_transform_tensors(placeholders, source)
        if rebuilt:
            _check_unstored_buffers(model, placeholders, source)
        # Only now, every shape checked against the model that will hold it, are payloads decoded.
        state = _decode_all(manifest, stored, source)
        if isinstance(data, FileBytes):
            data.check_unchanged()
        transform_state = _split_transform_state(state)
        _values_from_codes(manifest, state, transform_state, source)
        check_bias_heads(model, state, source)
        _check_finite(state, manifest.get("nonfinite", []), source)
        remove_transforms(model, keep_values=False)
        detach_all(model, fold_smoothing=False)  # the stored weights replace these below
        modules = dict(model.named_modules())
        for layer, bits in quantized.items():
            smooth = state.get(f"{layer}.input_quantizer.smooth")
            attach(modules[layer], ActivationQuantizer(int(bits), smooth=None if smooth is None else torch.ones_like(smooth)))
        _fit_shapes(model, state)
        sync_attention(model)
        _assign(model, state)
        if rebuilt:
            _materialize_unstored(model, source)
        if restore and manifest.get("transforms"):
            restore_transforms(model, manifest["transforms"], transform_state)
        model.eval()
        _check_runs(model, manifest, source)
    model.netshrink_manifest = {k: manifest.get(k) for k in ("recipe", "info")}  # type: ignore[assignment]
    return model


def _placeholders(manifest: dict, stored: dict) -> dict[str, torch.Tensor]:
    """Each tensor the file stores as an empty tensor of its shape and dtype on the meta device:
    what the model is checked against before any payload is decoded."""
    out = {}
    for name, entry in manifest["tensors"].items():
        source = manifest["tensors"][entry["same_as"]] if "same_as" in entry else entry
        original = entry.get("same_as", name)
        dtype = torch.float32 if "enc" in source else torch.from_numpy(np.zeros(0, dtype=stored[original].dtype)).dtype
        out[name] = torch.empty(entry["shape"], dtype=dtype, device="meta")
    return out


def _check_transform_tensors(placeholders: dict[str, torch.Tensor], source: str) -> None:
    """A transform's own tensors (a grid's scales and zero points: one per row or group) hold no
    more values than the weight they belong to."""
    for key, tensor in placeholders.items():
        if STATE_KEY in key:
            weight = placeholders.get(f"{key.partition(STATE_KEY)[0]}.weight")
            if weight is None or tensor.numel() > weight.numel():
                raise NetshrinkError(f"{source}: transform tensor {key!r} is larger than its layer's weight")


def _check_unstored_buffers(model: nn.Module, placeholders: dict[str, torch.Tensor], source: str) -> None:
    """A rebuilt model's buffers that files do not store (a transformers model's position ids,
    rotary frequencies) are computed when it is built: their size, which its config sets, may not
    exceed what the file's tensors come to (or 16 MiB for a small model)."""
    stored = set(model.state_dict())
    unstored = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name not in stored)
    allowed = max(1 << 24, sum(t.numel() * t.element_size() for t in placeholders.values()))
    if unstored > allowed:
        raise NetshrinkError(f"{source}: its model's config asks for {unstored / 2**20:.0f} MiB of computed buffers, "
                             f"more than its {allowed / 2**20:.0f} MiB of stored tensors; the config was changed")


def _materialize_unstored(model: nn.Module, source: str) -> None:
    """Give a model built on the meta device the tensors files do not store. A transformers model
    (version 5 and later) computes its non-persistent buffers in its own weight initialisation
    (as its ``from_pretrained`` does after building on the meta device), which skips every tensor
    marked as loaded; any other model must have had every tensor in the file."""
    left = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left and hasattr(model, "initialize_weights") and hasattr(model, "named_non_persistent_buffers"):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if not tensor.is_meta:
                tensor._is_hf_initialized = True
        for name, buffer in list(model.named_non_persistent_buffers()):
            if buffer.is_meta:
                owner_name, _, attribute = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner.register_buffer(attribute, torch.empty_like(buffer, device="cpu"), persistent=False)
        try:
            model.initialize_weights()
        except Exception as exc:  # noqa: BLE001 - the library's own complaint, in one line
            raise NetshrinkError(f"{source}: its model cannot compute its buffers: {first_line(exc)}") from None
        left = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise NetshrinkError(f"{source} does not hold every tensor its model needs (e.g. {left[0]}); "
                             "pass model=<an instance of the same architecture>")


def _check_finite(state: dict[str, torch.Tensor], declared: list, source: str) -> None:
    """Stored floats are finite, except in tensors the file says were saved with inf or NaN."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and name not in declared and not bool(torch.isfinite(tensor).all()):
            raise NetshrinkError(f"{source}: tensor {name!r} holds inf or NaN, which it was not saved with")


def _example_input(model: nn.Module, spec: Any):
    """A tiny input the model takes, where the file says what its input is: a zoo model's image
    (from its spec), a transformers model's own dummy inputs; None for a caller's model."""
    if isinstance(spec, dict) and "in_shape" in spec:
        return torch.rand((1, *spec["in_shape"]), generator=torch.Generator().manual_seed(0))
    config = getattr(model, "config", None)
    if isinstance(spec, dict) and "transformers" in spec and getattr(model, "main_input_name", None) == "input_ids" \
            and not any(hasattr(config, part) for part in ("vision_config", "audio_config")):
        try:  # token ids the smallest vocabulary holds (and the decoder's, for encoder-decoder models)
            example = dict(model.dummy_inputs)
        except Exception:  # noqa: BLE001 - a model class without dummy inputs: checked by structure only
            return None
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in example:
            example["decoder_input_ids"] = example["input_ids"]
        return example
    return None  # images, audio, several inputs, a caller's model: checked by structure only


def _check_runs(model: nn.Module, manifest: dict, source: str) -> None:
    """A loaded model must run: every layer's tensors agree with each other and with its sizes,
    and where the file says what the input is, one forward pass on a tiny input gives finite
    outputs (unless the file was saved with non-finite tensors)."""
    for name, module in model.named_modules():
        problem = _layer_problem(module)
        if problem:
            raise NetshrinkError(f"{source} loads a model that cannot run: {name or 'the model'} {problem}")
    example = _example_input(model, manifest.get("model"))
    if example is None:
        return
    try:
        with torch.no_grad():
            out = model(**example) if isinstance(example, dict) else model(example)
    except Exception as exc:  # noqa: BLE001 - any failure here is the file's
        raise NetshrinkError(f"{source} loads a model that cannot run: {first_line(exc)}") from None
    if not manifest.get("nonfinite") and not all(bool(torch.isfinite(t).all()) for t in _tensors_in(out)):
        raise NetshrinkError(f"{source} loads a model whose outputs are inf or NaN")
    classes = manifest["model"].get("classes")
    if classes is not None and (not torch.is_tensor(out) or out.shape[-1] != classes):
        raise NetshrinkError(f"{source} loads a model with {out.shape[-1] if torch.is_tensor(out) else 'no'} outputs "
                             f"where its spec says {classes} classes")


def _layer_problem(module: nn.Module) -> str | None:
    """What makes one layer's tensors disagree with each other, if anything."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, LINEAR_CONV) and torch.is_tensor(weight):
        if weight.dim() < 2:
            return f"has a weight of shape {list(weight.shape)}"
        if torch.is_tensor(bias) and tuple(bias.shape) != (weight.shape[0],):
            return f"has {list(bias.shape)} biases for {weight.shape[0]} outputs"
    elif isinstance(module, nn.Embedding) and torch.is_tensor(weight) and weight.dim() != 2:
        return f"has an embedding table of shape {list(weight.shape)}"
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        sizes = {t.shape for t in (weight, bias, module.running_mean, module.running_var) if torch.is_tensor(t)}
        if len(sizes) > 1:
            return "has statistics and scales of different sizes"
        if torch.is_tensor(module.running_var) and bool((module.running_var < 0).any()):
            return "has a negative running variance (its outputs would be NaN)"
    elif isinstance(module, nn.LayerNorm) and torch.is_tensor(weight):
        if tuple(weight.shape) != tuple(module.normalized_shape) or torch.is_tensor(bias) and bias.shape != weight.shape:
            return f"normalises {list(module.normalized_shape)} with scales of shape {list(weight.shape)}"
    return None


def _tensors_in(value) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def _as_stored(model: nn.Module, names: list[str], state: dict[str, torch.Tensor], source: str) -> None:
    """Give a model built as its class builds it the form the file's tensors were saved from: its
    transformers Conv1D layers that the file stores as Linear layers (``names``) turned into that
    form, and the kept-head buffers of attention that keeps a slice of a shared position bias."""
    modules = dict(model.named_modules())
    for name in names:
        if not (is_conv1d(modules.get(name)) or isinstance(modules.get(name), LinearFromConv1D)):
            raise NetshrinkError(f"{source} does not fit this model: it stores {name!r} as a transformers Conv1D "
                                 f"layer, and the model has {type(modules.get(name)).__name__ if name in modules else 'no such layer'}")
    as_linear(model, names)
    restore_bias_heads(model, state, source)


def _assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make the decoded tensors the model's own instead of copying them in: loading holds the
    model once, a model built on the meta device is filled without allocating its weights first,
    and the tensors the model had are released, never written. Each tensor takes the dtype and
    device the model has for it; weights the model ties (one Parameter in several places) stay
    tied; tensors the file stored once but the model keeps apart get their own copy."""
    current = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = {key: first.setdefault(id(tensor), key) for key, tensor in current.items()}
    ready: dict[str, torch.Tensor] = {}
    taken: set[int] = set()
    for key, tensor in state.items():
        if tied[key] != key:
            continue
        target = current[key]
        tensor = tensor.to(dtype=target.dtype) if target.is_meta else tensor.to(device=target.device, dtype=target.dtype)
        ready[key] = tensor.clone() if id(tensor) in taken else tensor
        taken.add(id(ready[key]))
    model.load_state_dict({key: ready[tied[key]] for key in state}, strict=True, assign=True)
    for key, owner_key in tied.items():
        if owner_key != key:
            owner_name, _, attribute = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            first_name, _, first_attribute = owner_key.rpartition(".")
            setattr(owner, attribute, getattr(model.get_submodule(first_name) if first_name else model, first_attribute))


def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the model the layer sizes stored in the file (structured pruning removes neurons and
    channels, so a freshly built model's widths no longer match); :func:`_check_fits` has
    checked that only those sizes differ."""
    for key, tensor in state.items():
        owner_name, _, attribute = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue  # load_state_dict will name the unexpected key
        current = getattr(owner, attribute, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        if not isinstance(owner, (*COMPRESSIBLE, nn.modules.batchnorm._BatchNorm)):
            continue  # load_state_dict will report the mismatch
        replacement = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(owner, attribute, nn.Parameter(replacement))
        else:
            setattr(owner, attribute, replacement)
        sync_sizes(owner)


def load(path: str | os.PathLike, model: nn.Module | None = None, *, restore: bool = True,
         allow_unchecked: bool = False) -> nn.Module:
    """Load a netshrink file. Zoo models are rebuilt from the file; for any other architecture pass
    an instance as ``model`` and its weights are replaced. Weights are bit-identical to those saved.

    With ``restore=True`` (the default) each layer gets back the weight transforms it had when
    saved (pruning masks, quantization grids, codebooks, clipping), so fine-tuning the loaded
    model keeps pruned weights at zero and weights on their grid; ``restore=False`` returns plain
    weights (what :func:`netshrink.bake` gives). A file that fails any check raises one
    :class:`NetshrinkError` and ``model`` is left as it was. Loading never reaches the network.

    Files of format 1 (netshrink 0.1) carry no checksum: they load only with
    ``allow_unchecked=True`` (for a file you trust); save them again to get a checked file.
    """
    check_flag("restore", restore)
    check_flag("allow_unchecked", allow_unchecked)
    path = Path(path)
    with open_regular(path) as file:  # read a piece at a time: the file is never held whole in memory
        return from_bytes(FileBytes(file, str(path)), model, source=str(path), restore=restore,
                          allow_unchecked=allow_unchecked)
