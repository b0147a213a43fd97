"""Structured pruning of transformers: whole attention heads and feed-forward neurons are removed,
so the model becomes a smaller dense transformer that does less work per token on any runtime.

torch.fx cannot trace Hugging Face models, so the couplings are read off the module structure:

* an **attention block** has Linear query/key/value projections (``query``/``key``/``value`` in
  BERT, ``q_lin``/``k_lin``/``v_lin`` in DistilBERT, ``q_proj``/``k_proj``/``v_proj`` in ViT, CLIP,
  BART, Whisper, Llama and most recent models) and a head size (``attention_head_size`` /
  ``dim_per_head`` / ``head_dim``); its output projection is the ``output.dense`` of the module
  that holds it in BERT, else a sibling ``out_lin``/``o_proj``/``out_proj``. Removing head h
  removes rows [h*d, (h+1)*d) of query, key and value and those columns of the output
  projection. Attention reshapes with ``view(..., -1, head_size)``, so nothing else changes but
  the module's head-count attributes, which are set to the new counts (and again when a file of
  the smaller model is loaded into one built full size). With grouped-query attention (keys and
  values with fewer heads than the queries, Llama/Mistral/Qwen) a unit is one key/value head
  together with the query heads that read it, so the sharing stays as it was. GPT-2's fused
  ``c_attn`` (query, key and value in one projection, split in three) with ``c_proj`` is one too:
  head h owns its rows in each third. MPNet (``q``/``k``/``v``/``o``) hands every layer one relative
  position bias computed once: a layer that lost heads keeps a buffer of the heads it kept, and a
  forward pre-hook gives it only their slice of the bias. T5 makes that bias inside its first
  layer's attention, where no hook can reach it, so its attention is not taken (its feed-forward
  blocks are).
* a **feed-forward block** is ``intermediate.dense`` followed by ``output.dense`` (BERT),
  ``ffn.lin1``/``ffn.lin2`` (DistilBERT), ``fc1``/``fc2`` (ViT, CLIP, BART, Whisper, OPT) or a gated
  ``gate_proj``/``up_proj`` pair followed by ``down_proj`` (Llama family) or ``c_fc``/``c_proj``
  (GPT-2), or T5's ``wi`` (or gated ``wi_0``/``wi_1``) and ``wo``, the plainer names only in a layer
  that also holds an attention block: removing neuron j
  removes row j of the input projections and column j of the output projection. (GPT-2's layers
  are transformers ``Conv1D``, which netshrink turns into Linear layers first: :mod:`.conv1d`.)

Without data, units are ranked by weight magnitude (L1 of everything the unit owns: its rows in
the input projections and its columns in the output projection); distillation afterwards
recovers what they cost. With ``calibration`` data the removal is data-aware and needs no
retraining to be usable (the structured Optimal Brain Surgeon of ZipLM, Kurtic et al. 2023, in
the layer-wise form of Kwon et al. 2022): blocks are solved in the order the model runs them,
each on the inputs the already-pruned blocks before it produce. For a block's output projection
``y = W x`` with input second moments ``H`` (of the heads' concatenated contexts, or of the
feed-forward activations), units are removed one at a time, always the one whose loss the other
units can best make up for: removing input group ``g`` costs ``tr(W_g (H^-1_gg)^-1 W_g^T)``
after the optimal change of the remaining columns. The kept columns are then refit by least
squares, ``W_K = (W H)_{:,K} H_KK^-1``, so the projection reproduces the dense block's output as
well as the kept units allow (``H`` damped by 1% of its mean diagonal, which also pulls the
refit gently towards the old weights). The Optimal Brain Surgeon step is written here because no
maintained library applies it to whole heads of Hugging Face modules.

By default every block keeps the same fraction. ``allocation="global"`` keeps the same totals but
spreads them by measured damage: each block is tried alone at several counts on the dense model,
the error each trial leaves at the model's output is measured on calibration data, and the counts
with the least total error are chosen (a multiple-choice knapsack, :mod:`netshrink.compress.knapsack`);
the removal itself then runs as above with those counts.

A model without either block is refused before anything changes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..calibration import OutputDamage, dense_statistics, each_layer, take
from ...errors import NetshrinkError
from ..knapsack import solve
from ...training.batches import Progress
from .base import Method, Report, check_map_keys, check_range, each_value, per_layer, shrink_layer
from ...errors import preserved, trial
from .blocks import with_blocks

QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
HEAD_SIZE_NAMES = ("attention_head_size", "dim_per_head", "head_dim")
OUTPUT_NAMES = ("out_lin", "o_proj", "out_proj", "o")  # an output projection beside query/key/value
BIAS_HEADS = "position_bias_heads"  # buffer: the heads of a position bias shared by all layers that one keeps
HEAD_COUNT_NAMES = ("num_attention_heads", "n_heads", "num_heads")  # what attention modules call their query heads
FUSED_NAMES = ("c_attn", "c_proj")  # GPT-2: one projection for query, key and value, and the output projection
# (input projections, output projection) of a feed-forward block, relative to the module holding it:
# BERT's layer, DistilBERT's and T5's DenseReluDense (plain or gated), whose names say what they are;
# then names as plain as fc1/fc2, taken only in a layer with an attention block: ViT/CLIP's mlp and
# BART/Whisper/OPT's layer, Llama/Mistral/Qwen's gated mlp, GPT-2's mlp.
FFN_NAMES = ((("intermediate.dense",), "output.dense"), (("ffn.lin1",), "ffn.lin2"), (("wi",), "wo"),
             (("wi_0", "wi_1"), "wo"))
PLAIN_FFN_NAMES = ((("fc1",), "fc2"), (("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj"))
ALLOCATIONS = ("uniform", "global")
ALLOCATION_LEVELS = 16  # unit counts tried per block for a global allocation (every count for up to 16 units)
SCORING_SAMPLES = 256  # calibration examples a global allocation measures each trial on


@dataclass(eq=False)
class Projection:
    """An input projection of a block: unit ``u`` owns rows ``[u*rows, (u+1)*rows)`` of each of its
    ``segments`` equal parts (3 for GPT-2's fused query/key/value projection, else 1)."""

    layer: nn.Linear
    rows: int
    segments: int = 1

    def rows_of(self, kept: torch.Tensor, units: int) -> torch.Tensor:
        part = units * self.rows
        return torch.cat([segment * part + _unit_columns(kept, self.rows) for segment in range(self.segments)])

    def score(self, units: int) -> torch.Tensor:
        """L1 of each unit's rows."""
        return self.layer.weight.detach().abs().reshape(self.segments, units, -1).sum((0, 2))


@dataclass(eq=False)
class Block:
    """A block of a transformer whose units (heads, or feed-forward neurons) can be removed: unit
    ``u`` owns its rows of each input :class:`Projection` and columns ``[u*size, (u+1)*size)`` of
    ``output``. A head is one unit with ``size`` its dimension; with grouped-query attention a unit
    is one key/value head with the ``group`` query heads that read it, so the model keeps the same
    sharing. A neuron is one unit of size 1."""

    name: str
    unit: str  # "heads" or "feed-forward neurons"
    inputs: list[Projection]
    output: nn.Linear
    size: int
    attention: nn.Module | None = None
    group: int = 1  # query heads per unit (grouped-query attention)

    @property
    def units(self) -> int:
        return self.output.in_features // self.size

    def describe(self, kept: int) -> str:
        if self.group == 1:
            return f"kept {kept} of {self.units} {self.unit}"
        return f"kept {kept * self.group} of {self.units * self.group} heads ({kept} of {self.units} key/value heads)"

    def head_counts(self) -> tuple[int, int]:
        """(query heads, key/value heads) as the projections are now."""
        head = self.size // self.group
        query, key = self.inputs[0], self.inputs[-1]
        return (query.layer.out_features // query.segments // head, key.layer.out_features // key.segments // head)

    def remove(self, kept: torch.Tensor) -> None:
        """Keep only units ``kept``: their rows of the input projections and their columns of the
        output projection; an attention module's head counts follow."""
        units = self.units
        for projection in self.inputs:
            shrink_layer(projection.layer, 0, projection.rows_of(kept, units))
        shrink_layer(self.output, 1, _unit_columns(kept, self.size))
        if self.attention is not None:
            sync_head_counts(self.attention, *self.head_counts())
            if _bias_argument(self.attention) is not None:
                keep_bias_heads(self.attention, kept)


def _bias_argument(attention: nn.Module) -> int | None:
    """Where an attention module's forward takes a position bias handed to every layer (MPNet):
    its position among the arguments after ``self``, or None if it takes none."""
    names = list(inspect.signature(type(attention).forward).parameters)
    return names.index("position_bias") - 1 if "position_bias" in names else None


def keep_bias_heads(attention: nn.Module, kept: torch.Tensor) -> None:
    """An attention module that is handed one position bias for all layers (MPNet) keeps only its
    heads' slice of it: the kept indices are a buffer (saved with the model) that a forward
    pre-hook selects with. A later removal indexes into the heads already kept."""
    current = getattr(attention, BIAS_HEADS, None)
    if current is None:
        attention.register_buffer(BIAS_HEADS, kept.clone())
        # where the bias comes is read once here, not on every forward
        attention.register_forward_pre_hook(partial(_slice_position_bias, index=_bias_argument(attention)),
                                            with_kwargs=True)
    else:
        setattr(attention, BIAS_HEADS, current[kept])


def _slice_position_bias(module: nn.Module, args: tuple, kwargs: dict, *, index: int):
    """Forward pre-hook: the position bias argument ([batch, heads, queries, keys], argument
    ``index`` after ``self``) cut to the module's kept heads, whether it came by position or by name."""
    heads = getattr(module, BIAS_HEADS)
    if len(args) > index and args[index] is not None:
        args = (*args[:index], args[index].index_select(1, heads), *args[index + 1:])
    elif kwargs.get("position_bias") is not None:
        kwargs = {**kwargs, "position_bias": kwargs["position_bias"].index_select(1, heads)}
    return args, kwargs


def restore_bias_heads(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Give a model built full size the slices of the shared position bias that ``state`` (a
    file's tensors, or placeholders of their shapes on the meta device) keeps, so its kept-head
    buffers and their hooks are there to take them. Each must be as many head indices as the
    layer's query projection has heads (:func:`check_bias_heads` checks their values once they
    are decoded): anything else would fail, or index the wrong heads, only when the model runs."""
    for key, attention, tensor, query, heads, size in _bias_heads_in(model, state):
        if hasattr(attention, BIAS_HEADS):
            continue
        if not (tensor.dtype == torch.int64 and tensor.dim() == 1 and isinstance(heads, int) and size
                and query is not None and len(tensor) * size == query.shape[0] and len(tensor) <= heads):
            raise _bad_bias_heads(source, key)
        keep_bias_heads(attention, torch.zeros(tensor.shape, dtype=tensor.dtype))


def check_bias_heads(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """The kept-head lists of ``state`` (decoded) are distinct heads of each layer's position bias."""
    for key, _, tensor, _, heads, _ in _bias_heads_in(model, state):
        values = tensor.tolist()
        if len(set(values)) != len(values) or not all(0 <= h < heads for h in values):
            raise _bad_bias_heads(source, key)


def _bias_heads_in(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[tuple]:
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        attention = modules.get(owner)  # a key naming no module is reported by the fit check
        if name != BIAS_HEADS or attention is None or _bias_argument(attention) is None:
            continue
        query = next((state.get(f"{owner}.{names[0]}.weight") for names in QKV_NAMES
                      if f"{owner}.{names[0]}.weight" in state), None)
        yield key, attention, tensor, query, getattr(attention, "num_attention_heads", None), _head_size(attention)


def _bad_bias_heads(source: str, key: str) -> NetshrinkError:
    return NetshrinkError(f"{source}: {key} is not a list of distinct heads of this model's position bias, "
                          "one per head its query projection keeps")


def sync_head_counts(attention: nn.Module, heads: int, key_value_heads: int) -> None:
    """Set an attention module's head-count attributes (those it has) to its current size."""
    for attribute in HEAD_COUNT_NAMES:
        if isinstance(getattr(attention, attribute, None), int):
            setattr(attention, attribute, heads)
    if isinstance(getattr(attention, "num_key_value_heads", None), int):
        attention.num_key_value_heads = key_value_heads
    for attribute in ("all_head_size", "split_size"):  # BERT's inner width; where GPT-2 splits its fused projection
        if isinstance(getattr(attention, attribute, None), int):
            setattr(attention, attribute, heads * _head_size(attention))


def sync_attention(model: nn.Module) -> None:
    """Give every attention block's module the head counts its projections now have: a model
    built full size and then given the smaller layers of a file (:func:`netshrink.load`) must
    also be told how many heads it has where its forward reads the count (Whisper's keys)."""
    for block in attention_blocks(model):
        sync_head_counts(block.attention, *block.head_counts())


def _child(module: nn.Module, dotted: str):
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def _head_size(module: nn.Module) -> int | None:
    return next((getattr(module, a) for a in HEAD_SIZE_NAMES if isinstance(getattr(module, a, None), int)), None)


def attention_blocks(model: nn.Module) -> list[Block]:
    """Each attention block: Linear query/key/value projections with a head size, and an output
    projection (the holder's ``output.dense`` in BERT, else a sibling ``out_lin``/``o_proj``/
    ``out_proj``). Keys and values with fewer heads than the queries (grouped-query attention)
    make units of one key/value head and its query heads."""
    found = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        size = _head_size(module)
        for names in QKV_NAMES:
            query, key, value = (getattr(module, n, None) for n in names)
            if size is None or not all(isinstance(m, nn.Linear) for m in (query, key, value)):
                continue
            parent = modules.get(name.rpartition(".")[0]) if "." in name else model
            output = _child(parent, "output.dense") if parent is not module else None
            if not isinstance(output, nn.Linear):
                output = next((getattr(module, n) for n in OUTPUT_NAMES if isinstance(getattr(module, n, None), nn.Linear)),
                              None)
            kv_heads, remainder = divmod(key.out_features, size)
            if (not isinstance(output, nn.Linear) or output.in_features != query.out_features or remainder
                    or kv_heads == 0 or value.out_features != key.out_features or query.out_features % key.out_features):
                continue
            group = query.out_features // key.out_features
            found.append(Block(name, "heads", [Projection(query, group * size), Projection(key, size),
                                               Projection(value, size)], output, group * size, module, group))
        fused, output = (getattr(module, n, None) for n in FUSED_NAMES)
        if (size is not None and isinstance(fused, nn.Linear) and isinstance(output, nn.Linear)
                and fused.out_features == 3 * output.in_features and output.in_features % size == 0):
            found.append(Block(name, "heads", [Projection(fused, size, segments=3)], output, size, module))
    return found


def ffn_blocks(model: nn.Module, attention: list[Block]) -> list[Block]:
    """Each feed-forward block: input projections (one, or a gate and an up projection) whose
    outputs, neuron by neuron, are the output projection's inputs. Plain names (``fc1``/``fc2``
    ...) count only in a layer that also holds an attention block: elsewhere (an MLP, a CNN's
    classifier) there may be a computation between them that is not neuron by neuron."""
    layers = {name.rpartition(".")[0] for name in (block.name for block in attention)}
    found, seen = [], set()
    for name, module in model.named_modules():
        holder = name.rpartition(".")[0]
        in_layer = any(layer == n or layer.startswith(f"{n}.") or not n for layer in layers for n in (name, holder))
        for input_names, output_name in FFN_NAMES + (PLAIN_FFN_NAMES if in_layer else ()):
            inputs = [_child(module, n) for n in input_names]
            output = _child(module, output_name)
            if (isinstance(output, nn.Linear) and id(output) not in seen
                    and all(isinstance(m, nn.Linear) and m.out_features == output.in_features != m.in_features
                            for m in inputs)):
                seen.add(id(output))
                found.append(Block(name, "feed-forward neurons", [Projection(m, 1) for m in inputs], output, 1))
    return found


def _levels(units: int) -> list[int]:
    """The unit counts a global allocation tries for a block of ``units``, ascending, ending with all."""
    steps = min(units, ALLOCATION_LEVELS)
    return sorted({max(1, round(units * i / steps)) for i in range(1, steps + 1)})


def keep_count(total: int, fraction: float) -> int:
    """How many of ``total`` units a kept ``fraction`` leaves: the nearest count, at least one."""
    return max(1, int(round(fraction * total)))


def _keep_top(score: torch.Tensor, fraction: float) -> torch.Tensor:
    return torch.sort(torch.topk(score, keep_count(len(score), fraction)).indices).values


def _unit_columns(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The rows/columns that units ``kept`` own when each owns ``size`` consecutive ones (a head's
    dimensions; 1 for a neuron)."""
    return (kept[:, None] * size + torch.arange(size)).flatten()


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.double().clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0  # inputs that never varied: any value serves, and H stays invertible
    return h + torch.eye(len(h), dtype=h.dtype) * damp * float(diagonal.mean())


def surgeon_order(weight: torch.Tensor, hessian: torch.Tensor, group: int, keep: int,
                  damp: float = 0.01) -> list[int]:
    """The input groups (``group`` consecutive columns each) of ``weight`` ``[out, in]`` in the
    order the structured Optimal Brain Surgeon removes them under the input second moments
    ``hessian`` ``[in, in]``, until ``keep`` are left: each time the group whose loss the others
    can best make up for. The order is nested: its first ``k`` are what removing ``k`` takes."""
    w = weight.detach().double()
    inverse = torch.linalg.inv(_damped(hessian, damp))
    groups = w.shape[1] // group
    alive = torch.ones(groups, dtype=torch.bool)
    work, removed = w.clone(), []
    for _ in range(groups - keep):
        blocks = inverse.view(groups, group, groups, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
        blocks[~alive] = torch.eye(group, dtype=blocks.dtype)  # removed groups' blocks are zero now
        cost = torch.einsum("ong,ngh,onh->n", work.view(-1, groups, group), torch.linalg.inv(blocks),
                            work.view(-1, groups, group))
        cost[~alive] = float("inf")
        g = int(cost.argmin())
        columns = slice(g * group, (g + 1) * group)
        correction = torch.linalg.inv(inverse[columns, columns])
        work -= work[:, columns] @ correction @ inverse[columns, :]
        inverse -= inverse[:, columns] @ correction @ inverse[columns, :]
        alive[g] = False
        removed.append(g)
    return removed


def refit(weight: torch.Tensor, hessian: torch.Tensor, group: int, kept: torch.Tensor,
          damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """The least-squares weight on the columns of groups ``kept`` (``[out, len(kept) * group]``)
    and the output error it leaves, as a fraction of the output's energy ``tr(W H W^T)``."""
    w, h = weight.detach().double(), _damped(hessian, damp)
    columns = _unit_columns(kept, group)
    fitted = torch.linalg.solve(h[columns][:, columns], (w @ h[:, columns]).T).T
    change = w.clone()
    change[:, columns] -= fitted
    energy = float(((w @ h) * w).sum())
    return fitted.to(weight.dtype), float(((change @ h) * change).sum()) / max(energy, 1e-30)


def surgeon_keep(weight: torch.Tensor, hessian: torch.Tensor, group: int, keep: int,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Which ``keep`` input groups of ``weight`` to keep (:func:`surgeon_order`) and their
    :func:`refit`: (kept group indices, sorted; the refit weight; the output error left)."""
    kept = _left(weight.shape[1] // group, surgeon_order(weight, hessian, group, keep, damp))
    return (kept, *refit(weight, hessian, group, kept, damp))


def _left(groups: int, removed: list[int]) -> torch.Tensor:
    """The group indices of ``range(groups)`` not in ``removed``, sorted."""
    gone = set(removed)
    return torch.tensor([g for g in range(groups) if g not in gone], dtype=torch.long)


@dataclass(frozen=True)
class UnitCount:
    """One count a block may keep and the damage measured with it (a knapsack choice)."""

    units: int
    damage: float


@dataclass(frozen=True, kw_only=True)
class RemoveHeads(Method):
    """Remove attention heads and feed-forward neurons of a transformer: keep the fraction
    ``heads`` of each attention block's heads and ``neurons`` of each feed-forward block's
    neurons (1.0 keeps all), ranked by weight magnitude, or with calibration data by the structured
    Optimal Brain Surgeon. Per-block maps use the block's module name (e.g.
    ``{"encoder.layer.0.attention.self": 1.0, "*": 0.7}``; the report names them); ``allocation="global"`` (with data)
    spreads one model-wide fraction over the blocks instead."""

    name: ClassVar[str] = "heads"
    heads: float | dict = 0.7
    neurons: float | dict = 0.7
    samples: int = 1024  # calibration examples, when data is given: more keep helping (transformer_pruning.md)
    batch_size: int = 32
    allocation: str = "uniform"  # or "global": the same totals, spread over blocks by measured damage (needs data)
    block_steps: int = 0  # with data: then tune each transformer layer's remaining weights to its dense output

    def check(self) -> None:
        super().check()
        check_range("heads", self.heads, 0.0, 1.0, low_open=True)
        check_range("neurons", self.neurons, 0.0, 1.0, low_open=True)
        check_range("samples", self.samples, 1, 1e9, integer=True)
        check_range("batch_size", self.batch_size, 1, 1e9, integer=True)
        check_range("block_steps", self.block_steps, 0, 1e6, integer=True)
        if self.allocation not in ALLOCATIONS:
            raise NetshrinkError(f"allocation must be one of {', '.join(ALLOCATIONS)}. Received: "
                                 f"allocation={self.allocation!r}")
        if self.allocation == "global" and any(isinstance(v, dict) for v in (self.heads, self.neurons)):
            raise NetshrinkError("allocation='global' spreads one model-wide fraction of heads and one of neurons: "
                                 "give heads and neurons as numbers, not per-block maps")

    def blocks(self, model: nn.Module) -> list[Block]:
        """The model's attention and feed-forward blocks, checked: refused before any change
        where there are none, or where the model already carries weight transforms."""
        if not isinstance(model, nn.Module):
            raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
        attention = attention_blocks(model)
        found = attention + ffn_blocks(model, attention)
        if not attention and (not found or any(fraction < 1 for fraction in each_value(self.heads))):
            raise NetshrinkError(
                f"{type(model).__name__} has no attention block netshrink can remove heads from (query/key/value "
                "Linear layers or GPT-2's fused c_attn, with a head size; T5, whose first layer makes the position "
                "bias every layer adds to its heads, is not supported)" + (
                    ": pass heads=1.0 to remove its feed-forward neurons only" if found else
                    " and no feed-forward block (intermediate/output, fc1/fc2 or gate/up/down Linear layers): "
                    "use remove_units for other models"))
        if any(hasattr(m, "parametrizations") for m in model.modules()):
            raise NetshrinkError("remove heads before other compression (the model has weight transforms): start "
                                 "from the dense model, or netshrink.bake it first")
        names = {block.name: block.attention or block.output for block in found}
        check_map_keys("heads", self.heads, names)
        check_map_keys("neurons", self.neurons, names)
        return found

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
        return {block.name: modules[block.name] for block in self.blocks(model)}

    def _select(self, model: nn.Module):
        return self.select(model), []

    def _fraction(self, block: Block) -> float:
        return float(per_layer(self.heads if block.unit == "heads" else self.neurons, block.name, block.unit))

    def run(self, model: nn.Module, calibration=None, **_: Any) -> Report:
        blocks = self.blocks(model)
        if calibration is None and self.allocation == "global":
            raise NetshrinkError("allocation='global' measures each block's damage on data: pass calibration=...")
        if calibration is None and self.block_steps:
            raise NetshrinkError(f"block_steps={self.block_steps} tunes the layers on data: pass calibration=...")
        if calibration is not None:
            names = {id(m): n for n, m in model.named_modules()}
            projections = {names[id(layer)]: layer for block in blocks
                           for layer in [p.layer for p in block.inputs] + [block.output]}
            return with_blocks(model, lambda: self._run_on_data(model, blocks, calibration), calibration,
                               steps=self.block_steps, samples=self.samples, batch_size=self.batch_size,
                               desc=self.name, tuned=projections)
        report = Report(self.name)
        plans = []
        for block in blocks:
            # L1 of everything a unit owns: its rows of the input projections, its columns of the output
            score = sum(projection.score(block.units) for projection in block.inputs)
            score = score + block.output.weight.detach().abs().reshape(-1, block.units, block.size).sum((0, 2))
            kept = _keep_top(score, self._fraction(block))
            if len(kept) < block.units:
                plans.append((block, kept))
                report.changed.append((block.name, block.describe(len(kept))))
        with preserved(model), torch.no_grad():
            for block, kept in plans:
                block.remove(kept)
        return report

    def _run_on_data(self, model: nn.Module, blocks: list[Block], calibration) -> Report:
        """Data-aware removal (see the module docstring), block after block in execution order."""
        report = Report(self.name)
        names = {id(m): n for n, m in model.named_modules()}
        by_output = {names[id(block.output)]: block for block in blocks}  # output projection's name -> its block
        keep = {block: keep_count(block.units, self._fraction(block)) for block in blocks}
        if self.allocation == "global":
            self._spread_budgets(model, by_output, keep, calibration, report)
        outputs = {n: block.output for n, block in by_output.items() if keep[block] < block.units}
        with torch.no_grad():
            for output_name, stats in each_layer(model, outputs, calibration, frozenset({"hessian"}),
                                                 samples=self.samples, batch_size=self.batch_size, desc=self.name):
                block = by_output[output_name]
                kept, weight, error = surgeon_keep(block.output.weight, stats.hessian, block.size, keep[block])
                described = block.describe(len(kept))
                block.remove(kept)
                block.output.weight = nn.Parameter(weight)
                report.changed.append((block.name, f"{described} (data-aware"
                                                   f"{', allocated globally' if self.allocation == 'global' else ''}: "
                                                   f"output error {100 * error:.2f}% of its energy)"))
        return report

    def _spread_budgets(self, model: nn.Module, by_output: dict[str, Block], keep: dict[Block, int], calibration,
                        report: Report) -> None:
        """Global allocation: keep as many heads, and as many neurons, in all as the uniform
        fractions would, spread where they matter. Each block is tried alone at up to
        ``ALLOCATION_LEVELS`` unit counts (its Optimal Brain Surgeon removal and refit, on the dense
        model's inputs; the rest of the model dense), and the damage of each is measured at the
        model's output on calibration data (squared error over real tokens, relative to the
        output's energy). Damages are added across blocks, as for small changes, and
        :func:`netshrink.compress.knapsack.solve` picks the counts with the least total; ``keep`` is updated."""
        outputs = {n: block.output for n, block in by_output.items()}
        hessians = dense_statistics(model, outputs, calibration, frozenset({"hessian"}), samples=self.samples,
                                    batch_size=self.batch_size)
        scoring = take(calibration, min(self.samples, SCORING_SAMPLES), self.batch_size)
        options: dict[Block, list[UnitCount]] = {}
        progress = Progress(len(by_output), f"{self.name}: measuring each block's damage", unit="block")
        try:
            damage = OutputDamage(model, scoring)
            with torch.no_grad():
                for done, (output_name, block) in enumerate(by_output.items()):
                    output, hessian, units = block.output, hessians[output_name].hessian, block.units
                    counts = sorted({*_levels(units), keep[block]})  # the uniform choice always fits the budget
                    removed = surgeon_order(output.weight, hessian, block.size, counts[0])
                    options[block] = [UnitCount(units, 0.0)]
                    for count in counts[:-1]:
                        kept = _left(units, removed[:units - count])  # the removal order is nested
                        weight, _ = refit(output.weight, hessian, block.size, kept)
                        with trial(model):
                            block.remove(kept)
                            output.weight = nn.Parameter(weight)
                            options[block].append(UnitCount(count, damage()))
                    progress.update(done + 1, f"{block.name}: {len(counts)} counts tried")
        finally:
            progress.close()
        for unit in ("heads", "feed-forward neurons"):
            chosen = [block for block in options if block.unit == unit]
            budget = sum(keep[block] for block in chosen)
            # Exact (one bucket per unit: a few thousand units per model) and never None, since the
            # uniform counts are among the choices.
            policy = solve({block: options[block] for block in chosen}, budget, units=max(budget, 1),
                           cost_of=attrgetter("units")) if chosen else {}
            for block, choice in policy.items():
                keep[block] = choice.units
                if choice.units == block.units:
                    report.skipped.append((block.name, f"the global allocation keeps all its {block.units * block.group} {unit}"))
