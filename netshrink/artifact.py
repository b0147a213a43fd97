"""One compressed file per model: a safetensors container with a JSON manifest.

* Tensors that no encoding shrinks are stored as ordinary float tensors, so a dense checkpoint is
  a plain safetensors file any tool reads; the others are ``uint8`` blobs (see ``codec.tensors``).
* The manifest (safetensors metadata key ``netshrink``) holds the format version, the model spec
  (zoo models are rebuilt from it), the recipe that produced the file, the activation quantizers,
  and per tensor: shape, encoding and a SHA-256 prefix of the decoded bytes.
* Loading never unpickles; a corrupt, truncated or foreign file raises one NetshrinkError line.
* Writes are atomic: a temporary file in the same folder, fsync, then rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from .codec import tensors as codec
from .errors import NetshrinkError
from .methods.activations import ActivationQuantizer, attach, input_quantizer
from .methods.base import COMPRESSIBLE, baked_state_dict, sync_sizes
from .models import model_from_spec

FORMAT, VERSION = "netshrink", 1
KEY = "netshrink"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def stored_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The arrays a file stores for ``model``: its baked state, with -0.0 as +0.0 (they compare
    equal and compute identically, but the sign bit would make the codec store it as a non-zero;
    masks written as w * mask leave many of them)."""
    arrays = {}
    for name, tensor in baked_state_dict(model).items():
        array = tensor.detach().cpu().numpy()
        if array.dtype == np.float32:
            array = np.where(array == 0, np.float32(0), array).astype(np.float32)
        arrays[name] = array
    return arrays


def to_bytes(model: nn.Module, *, recipe: list | None = None, info: dict | None = None) -> bytes:
    """Serialise ``model`` (its transforms baked into a copy; the model itself is not changed)."""
    quantizers = {name: m.input_quantizer.bits for name, m in model.named_modules()
                  if isinstance(input_quantizer(m), ActivationQuantizer)}
    stored: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, array in stored_arrays(model).items():
        entry: dict[str, Any] = {"shape": list(array.shape), "sha": _digest(array)}
        if array.dtype == np.float32 and array.size:
            encoded = codec.encode(array)
            if encoded[0] != codec.RAW:
                stored[name] = np.frombuffer(encoded, dtype=np.uint8)
                entry["enc"] = codec.encoding_name(encoded)
                entries[name] = entry
                continue
        stored[name] = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d tensors 0-d
        entries[name] = entry
    manifest = {"format": FORMAT, "version": VERSION, "model": getattr(model, "spec", None),
                "recipe": recipe or [], "activation_quantizers": quantizers, "tensors": entries,
                "info": info or {}}
    return st_save(stored, metadata={KEY: json.dumps(manifest, separators=(",", ":"))})


def save(model: nn.Module, path: str | os.PathLike, *, recipe: list | None = None,
         info: dict | None = None) -> int:
    """Write ``model`` to ``path`` atomically; returns the file's size in bytes.

    >>> from netshrink.models import build_model
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.nsk")
    >>> save(build_model("mlp"), path) > 400_000
    True
    """
    data = to_bytes(model, recipe=recipe, info=info)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return len(data)


def read_manifest(data: bytes, source: str = "file") -> tuple[dict, dict[str, np.ndarray]]:
    try:
        stored = st_load(data)
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_size])
        manifest = json.loads(header["__metadata__"][KEY])
    except Exception as exc:  # safetensors raises several types for foreign or cut files
        raise NetshrinkError(f"{source} is not a readable netshrink file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NetshrinkError(f"{source} is a safetensors file but not a netshrink file")
    if manifest.get("version") != VERSION:
        raise NetshrinkError(f"{source} has format version {manifest.get('version')}; this netshrink reads {VERSION}")
    return manifest, stored


def from_bytes(data: bytes, model: nn.Module | None = None, source: str = "file") -> nn.Module:
    """Rebuild a model from bytes written by :func:`to_bytes` (see :func:`load`)."""
    manifest, stored = read_manifest(data, source)
    state = {}
    try:
        for name, entry in manifest["tensors"].items():
            array = stored[name]
            shape = tuple(entry["shape"])
            if "enc" in entry:
                array = codec.decode(array.tobytes(), shape)
            if tuple(array.shape) != shape or _digest(array) != entry["sha"]:
                raise NetshrinkError(f"{source}: tensor {name!r} fails its checksum (corrupt file)")
            state[name] = torch.from_numpy(np.array(array))
    except NetshrinkError as exc:
        raise NetshrinkError(f"{source}: {exc}" if not str(exc).startswith(source) else str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise NetshrinkError(f"{source}: manifest and tensors disagree ({exc})") from None
    rebuilt = model is None
    if rebuilt:
        if not manifest.get("model"):
            raise NetshrinkError(f"{source} holds a model netshrink cannot rebuild by itself; "
                                 "pass model=<an instance of the same architecture>")
        model = model_from_spec(manifest["model"])
    modules = dict(model.named_modules())
    for layer, bits in manifest.get("activation_quantizers", {}).items():
        if layer not in modules:
            raise NetshrinkError(f"{source}: layer {layer!r} is not in the given model")
        attach(modules[layer], ActivationQuantizer(int(bits)))
    if rebuilt:
        _fit_shapes(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise NetshrinkError(f"{source} does not fit this model: {first}") from None
    model.eval()
    model.netshrink_manifest = {k: manifest[k] for k in ("recipe", "info")}  # type: ignore[assignment]
    return model


def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a freshly built zoo model the layer sizes stored in the file (structured pruning
    removes neurons and channels, so the spec's default widths no longer match)."""
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
        replacement = torch.empty(tensor.shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(owner, attribute, nn.Parameter(replacement))
        else:
            setattr(owner, attribute, replacement)
        sync_sizes(owner)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a netshrink file. Zoo models are rebuilt from the file; for any other architecture pass
    an instance as ``model`` and its weights are replaced. Weights are bit-identical to those saved."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NetshrinkError(f"cannot read {path}: {exc.strerror or exc}") from None
    return from_bytes(data, model, source=str(path))
