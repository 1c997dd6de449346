"""Batches: how the queries a plan sends to one option are run together, and what that costs.

An option is a model on a device *at a batch size B*. The assignment problem
(:mod:`engine.planning.solver`) costs a query on it at its per-request share, the fit's
prediction of a batch of B requests of the query's own shape divided by B: as if its
batch-mates had its shape. Batches are then formed, and predicted, from their real members:

**Formation rule.** The queries assigned to an option are sorted by output tokens, then
input tokens, longest first, and cut into consecutive batches of B; the last batch of an
option (its shortest queries) holds the remainder and may be smaller. Why this order: a
batch runs as many decode steps as its longest answer (transformers keeps finished rows
computing until then; llama.cpp drops them but the batch's wall time is still set by the
longest), and transformers pads every prompt to the longest one. Sorting puts similar
lengths together, so those wasted steps and padding stay small; for one length alone,
consecutive runs of the sorted list minimise the sum over batches of the longest member.
Decode steps dominate the cost of a request (the fits' τout terms are the largest), so the
output length is sorted first. Putting the remainder among the shortest queries makes the
least efficient batch (the one that shares its fixed costs among fewest requests) the
cheapest one. An option at batch size 1 keeps its queries in workload order.

**Prediction rule.** A batch of b requests is predicted as the fit's batch of b requests of
(longest τin, longest τout) among its members: ``E(max τin, max τout, b)``, and likewise
its runtime. For transformers this is the computation the batch does (left padding to the
longest prompt, every row decoding until the longest answer ends). For llama.cpp (no
padding, finished sequences leave the batch) it is an upper bound: with the fits' forms,
non-negative terms that grow with the token counts, no request costs more than the
longest shape. A batch of one is its query's own prediction. Each member's predicted
energy (runtime) is its share of the batch's, in proportion to its own per-request
prediction on the option, so members sum to the batch.

**Memory rule.** Where the model's files are here and cheap to read (a Hugging Face
``config.json`` and the safetensors headers, a GGUF header) and the device is one of this
host's (``cpu``, ``cuda:N``) with a readable free memory, a query is offered to an option of
batch size B only when a batch of B requests of its shape fits in that free memory
(:mod:`engine.backends.memory`: KV cache, activations and weights with the backend's
margin). Elsewhere (published profiles, another host's devices, unreadable files) the batch
sizes are limited by the fit's measured batch range alone, and the plan says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

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
        return f"{format_bytes(self.free_bytes)} free ({self.source})"


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


def form_batches(predictions, choice: np.ndarray) -> Batches:
    """The batches of ``choice`` (option index per query) on ``predictions`` (see the module docstring)."""
    choice = np.asarray(choice, dtype=np.int64)
    n = len(choice)
    rows = np.arange(n)
    options = predictions.options
    size_of_option = np.array([o.batch_size for o in options], dtype=np.int64)
    sizes = size_of_option[choice]
    tin = predictions.input_tokens[rows, choice]
    tout = np.asarray(predictions.output_tokens, dtype=np.int64)
    batched = sizes > 1
    # By option; within a batched option longest answer first, then longest prompt; ties (and
    # options at batch size 1) in workload order.
    order = np.lexsort((rows, np.where(batched, -tin, 0), np.where(batched, -tout, 0), choice))
    sorted_option = choice[order]
    option_start = np.r_[True, sorted_option[1:] != sorted_option[:-1]]
    first_of_run = np.maximum.accumulate(np.where(option_start, np.arange(n), 0))
    slot = (np.arange(n) - first_of_run) // sizes[order]  # the batch within its option
    new_batch = option_start | np.r_[True, slot[1:] != slot[:-1]]
    starts = np.flatnonzero(new_batch)
    batch_option = sorted_option[starts]
    batch_size = np.diff(np.r_[starts, n])
    longest_in = np.maximum.reduceat(tin[order], starts)
    longest_out = np.maximum.reduceat(tout[order], starts)
    energy = np.empty(len(starts))
    runtime = np.empty(len(starts))
    in_domain = np.empty(len(starts), dtype=bool)
    clamped = np.empty(len(starts), dtype=bool)
    for k in np.unique(batch_option):
        where = np.flatnonzero(batch_option == k)
        option = options[k]
        if option.batch_size == 1:  # a batch of one is its query's own prediction, exactly
            query = order[starts[where]]
            energy[where] = predictions.energy_j[query, k]
            runtime[where] = predictions.runtime_s[query, k]
            in_domain[where] = predictions.in_domain[query, k]
            clamped[where] = predictions.clamped[query, k]
            continue
        shape = (longest_in[where], longest_out[where], batch_size[where])
        energy_raw = option.energy_fit.predict_raw(*shape)
        runtime_raw = option.runtime_fit.predict_raw(*shape)
        energy[where] = np.maximum(energy_raw, 0.0)
        runtime[where] = np.maximum(runtime_raw, 0.0)
        in_domain[where] = option.energy_fit.in_domain(*shape) & option.runtime_fit.in_domain(*shape)
        clamped[where] = (energy_raw < 0) | (runtime_raw < 0)
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[order] = np.repeat(np.arange(len(starts)), batch_size)
    member_energy = np.empty(n)
    member_runtime = np.empty(n)
    member_energy[order] = _shares(predictions.energy_j[rows, choice][order], starts, batch_size, energy)
    member_runtime[order] = _shares(predictions.runtime_s[rows, choice][order], starts, batch_size, runtime)
    return Batches(option=batch_option, size=batch_size, input_tokens=longest_in, output_tokens=longest_out,
                   energy_j=energy, runtime_s=runtime, in_domain=in_domain, clamped=clamped, members=order,
                   starts=np.r_[starts, n], batch_of=batch_of, member_energy_j=member_energy,
                   member_runtime_s=member_runtime)


def _shares(weights: np.ndarray, starts: np.ndarray, sizes: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Each member's part of its batch's total, in proportion to ``weights`` (members in batch
    order); equal parts in a batch whose weights add up to 0."""
    sums = np.add.reduceat(weights, starts)
    repeated_sums = np.repeat(sums, sizes)
    equal = 1.0 / np.repeat(sizes, sizes)
    fraction = np.where(repeated_sums > 0, weights / np.where(repeated_sums > 0, repeated_sums, 1.0), equal)
    return np.repeat(totals, sizes) * fraction
