"""Batches: how the queries a plan sends to one option are run together, and what that costs.

An option is a model on a device *at a batch size B*. The assignment problem
(:mod:`engine.planning.solver`) costs a query on it at its per-request share, the fit's
prediction of a batch of B requests of the query's own shape divided by B: as if its
batch-mates had its shape. Batches are then formed, and predicted, from their real members:

**Formation rule.** A batch runs as many decode steps as its longest answer (transformers
keeps finished rows computing until then; llama.cpp drops them, but the batch's wall time is
still set by the longest), and transformers pads every prompt to the longest one: what grows
when lengths differ is that waste. So the queries assigned to an option are put in an order
that keeps similar lengths together, and cut into consecutive batches of at most B where the
cuts cost least: the exact shortest path over the cut points, every candidate batch costed
by the prediction rule below with the option's own fit. Two orders are tried, and the
cheaper kept per option: longest answer first (then longest prompt), and answers in bands of
5% longest first with the prompts sorted within each band (answers dominate, prompts then
pad little). Cutting where it costs least, not every B, keeps a long answer from holding up
a full batch (it gets a small batch, or one alone) and makes the smaller batches where they
cost least. For one length alone, consecutive runs of the sorted list are the best batches;
with two lengths the orders are a heuristic, and the energy after formation is reported as
what it is. An option at batch size 1 keeps its queries in workload order, one per batch.

**Prediction rule.** A batch of b requests is predicted by the fit's batch of b requests,
by how its backend runs different lengths together:

* padded (transformers, and every backend not known here): ``E(max τin, max τout, b)``,
  the longest prompt and the longest answer of its members. For transformers this is the
  computation the batch does (left padding to the longest prompt, every row decoding until
  the longest answer ends);
* ragged (llama.cpp: no padding, finished sequences leave the batch): the mean over its
  members of ``E(τin_i, max τout, b)``, each member's own prompt and the longest answer. For
  the fits' forms (non-negative terms that grow with the token counts) this is an upper
  bound: no member decodes longer than the longest.

Likewise its runtime. A batch whose raw prediction is negative (only the paper's published
form gives one) is predicted as the sum of its members' shares and flagged, never as free.
A batch of one is its query's own prediction. Each member's predicted energy (runtime) is
its share of the batch's, in proportion to its own per-request prediction on the option, so
members add up to the batch.

**Memory rule.** Where the model's files are here and cheap to read (a Hugging Face
``config.json`` and the safetensors headers, a GGUF header) and the device is one of this
host's (``cpu``, ``cuda:N``) with a readable free memory, a query is offered to an option of
batch size B only when a batch of B requests of its shape fits in that free memory
(:mod:`engine.backends.memory`: KV cache, activations and weights with the backend's
margin), and a batch is cut only where its longest prompt and answer fit at its size. Elsewhere (published profiles, another host's devices, unreadable files) the batch
sizes are limited by the fit's measured batch range alone, and the plan says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from engine.backends.memory import DTYPE_BYTES, ModelMemory, estimate_batch_memory, format_bytes, hf_model_memory


# -- memory ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchMemoryRule:
    """Whether a batch of an option fits in its device's free memory (see the module docstring).

    ``model``: the model's sizes; ``free_bytes``: the device's free memory when the plan was
    made; ``max_tokens_per_pass``: the backend's largest forward pass (llama.cpp's n_batch;
    None for transformers, which prefills a batch in one pass); ``source``: where the sizes
    were read, for the plan's note.
    """

    model: ModelMemory
    free_bytes: int
    max_tokens_per_pass: int | None
    source: str

    def fits(self, batch_size: int, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        """(N,) True where a batch of ``batch_size`` requests of each (τin, τout) fits (weights not loaded yet)."""
        tin = np.asarray(input_tokens, dtype=np.int64)
        tout = np.asarray(output_tokens, dtype=np.int64)
        pairs, inverse = np.unique(np.column_stack([tin, tout]), axis=0, return_inverse=True)
        needs = np.array([estimate_batch_memory(self.model, int(batch_size), int(a), int(b),
                                                max_tokens_per_pass=self.max_tokens_per_pass).total_bytes
                          for a, b in pairs], dtype=float)
        return (needs <= self.free_bytes)[np.asarray(inverse).reshape(-1)]

    def describe(self) -> str:
        return f"{format_bytes(self.free_bytes)} free; {self.source}"


def batch_memory_rule(backend: str, path, device: str) -> tuple[BatchMemoryRule | None, str]:
    """The memory rule of a model (catalog ``backend`` and resolved ``path``) on ``device``, or
    None with the reason it cannot be applied here (no local files, not this host's device,
    free memory unreadable). Reads only small headers; never loads the model."""
    from pathlib import Path

    from engine.backends.base import parse_device
    from engine.backends.memory import free_memory_bytes
    from engine.errors import DeviceUnavailableError

    if backend not in ("transformers", "llama.cpp") or path is None or not Path(path).exists():
        return None, "no model files here"
    try:
        parse_device(device)
    except DeviceUnavailableError:
        return None, f"{device} is not a device of this host"
    try:
        model, max_pass = _model_memory(backend, Path(path), device)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged or unusual files: the fit's range decides
        return None, f"its files could not be read for sizes ({type(exc).__name__})"
    if model is None:
        return None, "its files do not give the sizes a batch needs"
    free = free_memory_bytes(device)
    if free is None:
        return None, f"the free memory of {device} cannot be read here"
    source = "KV cache, activations and weights estimated from the model's files"
    return BatchMemoryRule(model=model, free_bytes=int(free), max_tokens_per_pass=max_pass, source=source), ""


def _model_memory(backend: str, path, device: str) -> tuple[ModelMemory | None, int | None]:
    """The model's sizes without loading it (nor torch): the backend's own readers for GGUF;
    config.json and the safetensors headers for transformers, in the dtype the backend loads
    on that device (float32 on the CPU, the checkpoint's dtype on a GPU)."""
    from engine.errors import ModelLoadError

    if backend == "llama.cpp":
        from engine.backends.llamacpp import DEFAULT_N_BATCH, LlamaCppBackend

        try:
            return LlamaCppBackend(path, "cpu").model_memory(), DEFAULT_N_BATCH
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from None
    from engine.backends.hf import count_safetensors_params

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        n_params = count_safetensors_params(path)
    except ModelLoadError as exc:
        raise ValueError(str(exc)) from None
    dtype = "float32" if device == "cpu" else str(config.get("dtype") or config.get("torch_dtype") or "float32")
    element = DTYPE_BYTES.get(dtype, 4)
    return hf_model_memory(config, n_params * element, element), None


# -- formation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batches:
    """The batches of an assignment (see the module docstring for the rules).

    Per batch (``b`` of them, grouped by option, each option's in formation order):
    option (its index), size (requests in it), input_tokens and output_tokens (the shape it
    is predicted at: its longest prompt, per the option's model's tokenizer, and its longest
    answer), energy_j and runtime_s (predicted, clamped at 0 as every prediction), in_domain
    (the shape and size inside both fits' measured ranges), clamped (a raw prediction was
    negative).

    Per query: members (query indices, batch after batch, each batch's longest first),
    starts (offset of each batch in ``members``, then N), batch_of (each query's batch),
    member_energy_j and member_runtime_s (its share of its batch's prediction).
    """

    option: np.ndarray
    size: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    energy_j: np.ndarray
    runtime_s: np.ndarray
    in_domain: np.ndarray
    clamped: np.ndarray
    members: np.ndarray
    starts: np.ndarray
    batch_of: np.ndarray
    member_energy_j: np.ndarray
    member_runtime_s: np.ndarray

    def __len__(self) -> int:
        return len(self.option)

    def per_option(self, n_options: int) -> np.ndarray:
        """(K,) batches of each option."""
        return np.bincount(self.option, minlength=n_options)


#: How a backend runs a batch of requests of different lengths (see the module docstring).
PADDED = "padded"   # transformers (and any backend not known here): prompts padded to the longest
RAGGED = "ragged"   # llama.cpp: each sequence its own prompt, finished ones leave the batch


def batch_rule(backend: str | None) -> str:
    """:data:`RAGGED` for llama.cpp, :data:`PADDED` for every other backend (the conservative rule)."""
    return RAGGED if backend == "llama.cpp" else PADDED


def form_batches(predictions, choice: np.ndarray) -> Batches:
    """The batches of ``choice`` (option index per query) on ``predictions`` (see the module docstring)."""
    choice = np.asarray(choice, dtype=np.int64)
    n = len(choice)
    rows = np.arange(n)
    tin_all = predictions.input_tokens[rows, choice]
    tout_all = np.asarray(predictions.output_tokens, dtype=np.int64)
    energy_share = predictions.energy_j[rows, choice]
    runtime_share = predictions.runtime_s[rows, choice]
    parts = []  # per option: (option, members in batch order, batch sizes)
    for k in np.unique(choice):
        option = predictions.options[k]
        members = np.flatnonzero(choice == k)
        if option.batch_size == 1:  # one request at a time, in workload order
            parts.append((k, members, np.ones(len(members), dtype=np.int64)))
            continue
        best = None
        for order in candidate_orders(tin_all[members], tout_all[members]):
            ordered = members[order]
            sizes, cost = best_cuts(option, tin_all[ordered], tout_all[ordered], energy_share[ordered])
            if best is None or cost < best[0]:
                best = (cost, ordered, sizes)
        parts.append((k, best[1], best[2]))
    order = np.concatenate([members for _, members, _ in parts])
    size = np.concatenate([sizes for _, _, sizes in parts])
    option_of_batch = np.concatenate([np.full(len(sizes), k) for k, _, sizes in parts])
    starts = np.r_[0, np.cumsum(size)]
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[order] = np.repeat(np.arange(len(size)), size)
    b = len(size)
    energy, runtime = np.empty(b), np.empty(b)
    in_domain, clamped = np.empty(b, dtype=bool), np.empty(b, dtype=bool)
    member_energy, member_runtime = np.empty(n), np.empty(n)
    longest_in = np.maximum.reduceat(tin_all[order], starts[:-1])
    longest_out = np.maximum.reduceat(tout_all[order], starts[:-1])
    for k, members, sizes in parts:
        where = np.flatnonzero(option_of_batch == k)
        option = predictions.options[k]
        if option.batch_size == 1:  # a batch of one is its query's own prediction, exactly
            energy[where], runtime[where] = energy_share[members], runtime_share[members]
            in_domain[where] = predictions.in_domain[members, k]
            clamped[where] = predictions.clamped[members, k]
            member_energy[members], member_runtime[members] = energy[where], runtime[where]
            continue
        predicted = predict_batches(option, tin_all[members], tout_all[members], sizes, energy_share[members],
                                    runtime_share[members])
        energy[where], runtime[where] = predicted.energy_j, predicted.runtime_s
        in_domain[where], clamped[where] = predicted.in_domain, predicted.clamped
        member_energy[members], member_runtime[members] = predicted.member_energy_j, predicted.member_runtime_s
    return Batches(option=option_of_batch, size=size, input_tokens=longest_in, output_tokens=longest_out,
                   energy_j=energy, runtime_s=runtime, in_domain=in_domain, clamped=clamped, members=order,
                   starts=starts, batch_of=batch_of, member_energy_j=member_energy, member_runtime_s=member_runtime)


@dataclass(frozen=True)
class _Predicted:
    """Predictions of consecutive batches of one option (per batch), and each member's share (per member)."""

    energy_j: np.ndarray
    runtime_s: np.ndarray
    in_domain: np.ndarray
    clamped: np.ndarray
    member_energy_j: np.ndarray
    member_runtime_s: np.ndarray


def predict_batches(option, tin: np.ndarray, tout: np.ndarray, sizes: np.ndarray, energy_share: np.ndarray,
                    runtime_share: np.ndarray) -> _Predicted:
    """Consecutive batches of ``sizes`` over members (τin, τout, in batch order) of ``option``,
    predicted by the option's backend rule (:data:`PADDED`: the fit's batch of its size at
    the longest prompt and answer; :data:`RAGGED`: the mean over members of the fit's batch
    of its size at the member's own prompt and the longest answer). A batch whose raw
    prediction is negative (only the paper's published form gives one) is predicted as the
    sum of its members' shares on the option and flagged clamped: never as free."""
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    per_member_size = np.repeat(sizes, sizes)
    longest_out = np.repeat(np.maximum.reduceat(tout, starts), sizes)
    fits = (option.energy_fit, option.runtime_fit)
    if batch_rule(option.backend) == RAGGED:
        shape = (tin, longest_out, per_member_size)
        raw = [np.add.reduceat(fit.predict_raw(*shape), starts) / sizes for fit in fits]
        inside = np.logical_and.reduceat(fits[0].in_domain(*shape) & fits[1].in_domain(*shape), starts)
    else:
        shape = (np.maximum.reduceat(tin, starts), longest_out[starts], sizes)
        raw = [fit.predict_raw(*shape) for fit in fits]
        inside = fits[0].in_domain(*shape) & fits[1].in_domain(*shape)
    totals, members = [], []
    for value, share in zip(raw, (energy_share, runtime_share)):
        batch = np.where(value < 0, np.add.reduceat(share, starts), value)
        totals.append(batch)
        members.append(_shares(share, starts, sizes, batch))
    return _Predicted(energy_j=totals[0], runtime_s=totals[1], in_domain=inside, clamped=(raw[0] < 0) | (raw[1] < 0),
                      member_energy_j=members[0], member_runtime_s=members[1])


#: Answers whose lengths differ by less than this ratio are one band when prompts are sorted within bands.
ANSWER_BAND_RATIO = 1.05


def candidate_orders(tin: np.ndarray, tout: np.ndarray) -> list[np.ndarray]:
    """Orders of an option's members to cut into batches: longest answer first (then longest
    prompt), and answers in bands of :data:`ANSWER_BAND_RATIO` longest first with the prompts
    sorted within each band (so that a batch of nearly equal answers also pads little). Ties
    keep the workload order."""
    index = np.arange(len(tin))
    band = np.floor(np.log(np.maximum(tout, 1)) / np.log(ANSWER_BAND_RATIO))
    return [np.lexsort((index, -tin, -tout)), np.lexsort((index, -tout, -tin, -band))]


def best_cuts(option, tin: np.ndarray, tout: np.ndarray, energy_share: np.ndarray) -> tuple[np.ndarray, float]:
    """The sizes of consecutive batches (each at most the option's batch size) over members in
    this order that cost the least energy by the option's rule, and that energy: the exact
    shortest path over where to cut (every window's cost predicted at its own size, the
    longest prompt in it, or for :data:`RAGGED` its mean prompt, and its longest answer; a
    negative raw prediction counted as the members' shares, as :func:`predict_batches` does)."""
    m = len(tin)
    longest = min(int(option.batch_size), m)
    tin = tin.astype(float)
    tout = tout.astype(float)
    cost = np.full((m, longest), np.inf)
    window_in, window_out, window_sum, window_share = tin.copy(), tout.copy(), tin.copy(), energy_share.copy()
    ragged = batch_rule(option.backend) == RAGGED
    for length in range(1, longest + 1):
        if length > 1:  # windows of this length, starting at 0 .. m - length
            window_in = np.maximum(window_in[:-1], tin[length - 1:])
            window_out = np.maximum(window_out[:-1], tout[length - 1:])
            window_sum = window_sum[:-1] + tin[length - 1:]
            window_share = window_share[:-1] + energy_share[length - 1:]
        raw = option.energy_fit.predict_raw(window_sum / length if ragged else window_in, window_out, length)
        cost[:m - length + 1, length - 1] = np.where(raw < 0, window_share, raw)
        if option.memory is not None and length > 1:  # a batch that would not fit is no candidate
            fits = option.memory.fits(length, window_in.astype(np.int64), window_out.astype(np.int64))
            cost[:m - length + 1, length - 1][~fits] = np.inf
    return _shortest_cuts(cost)


def _shortest_cuts(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """The cheapest way to cut m members into consecutive batches, ``cost[i, L - 1]`` being the
    batch of the L members from i: the shortest path from 0 to m in the graph whose edge
    i -> i + L costs that (Dijkstra in scipy: every cost is ≥ 0). Each edge also costs a
    negligible 1e-12 of the largest so that no batch is free (a sparse graph drops zero edges)."""
    m, longest = cost.shape
    lengths = np.arange(1, longest + 1)
    start = np.repeat(np.arange(m), longest)
    end = start + np.tile(lengths, m)
    values = cost.reshape(-1)
    keep = (end <= m) & np.isfinite(values)
    floor = 1e-12 * max(float(values[keep].max()), 1e-300)
    graph = csr_matrix((values[keep] + floor, (start[keep], end[keep])), shape=(m + 1, m + 1))
    distance, previous = dijkstra(graph, directed=True, indices=0, return_predecessors=True)
    cuts = [m]
    while cuts[-1] > 0:
        cuts.append(int(previous[cuts[-1]]))
    return np.diff(np.array(cuts[::-1], dtype=np.int64)), float(distance[m] - floor * (len(cuts) - 1))


def _shares(weights: np.ndarray, starts: np.ndarray, sizes: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Each member's part of its batch's total, in proportion to ``weights`` (members in batch
    order); equal parts in a batch whose weights add up to 0."""
    sums = np.add.reduceat(weights, starts)
    repeated_sums = np.repeat(sums, sizes)
    equal = 1.0 / np.repeat(sizes, sizes)
    fraction = np.where(repeated_sums > 0, weights / np.where(repeated_sums > 0, repeated_sums, 1.0), equal)
    return np.repeat(totals, sizes) * fraction
