"""Designs: which (input_tokens, output_tokens) points a profiling job measures.

- ``quick``: {8, 32, 128} x {8, 32, 128}, a few minutes for the demo models here;
- ``paper-grid``: the paper's full grid, powers of two 8..2048 for both counts (81 points);
- ``paper-sweeps``: the paper's two sweeps, inputs 8..2048 at 32 output tokens and
  outputs 8..4096 at 32 input tokens;
- ``space-filling``: a seeded Latin hypercube in log2 space over the given ranges,
  for a good surface with few points;
- ``custom``: the cross product of given input and output lists;
- ``adaptive``: a 3 x 3 grid in log2 space over the given ranges (default inputs
  8..256, outputs 8..64, the sample workloads' range) to start from; the worker then
  adds trials and points where the fitted surfaces are least sure, until the job's time
  budget is spent or the cross-validated error stops improving
  (:mod:`engine.profiling.adaptive`). The stored design grows as points are added.

Points past the model's context are dropped with a note (the paper's output sweep
reaches 4096 tokens, more than many models hold), never silently run short.

**The batch axis.** Every fixed design can be crossed with a list of batch sizes
(``batch_sizes``): each (τin, τout) becomes one point per batch size B, and one trial of a
point is one batch of B requests of that shape, run together (its energy and runtime are
the batch's; per request they are a B-th of it). Here the default is ``(1,)``, one request
at a time; the CLI and the Profile page default to :data:`DEFAULT_BATCH_SIZES` for a fixed
design, less the sizes that do not fit in the device's memory
(:func:`engine.profiling.jobs.prepare_job` with ``default_batch_axis``). The adaptive
design stays at batch size 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import InputError, Problem

#: Designs whose points are all known when the job is made (the ones the Profile page has offered).
DESIGN_KINDS = ("quick", "paper-grid", "paper-sweeps", "space-filling", "custom")
#: Every design: the fixed ones, and ``adaptive``, whose points grow while it runs (it takes a time budget).
ALL_DESIGN_KINDS = DESIGN_KINDS + ("adaptive",)
QUICK_TOKENS = (8, 32, 128)
ADAPTIVE_INPUTS = (8, 256)   # default ranges of the adaptive design: the sample workloads'
ADAPTIVE_OUTPUTS = (8, 64)
PAPER_POWERS = tuple(2 ** k for k in range(3, 12))  # 8 .. 2048
MAX_TOKENS = 1_000_000
#: The batch axis a fixed design gets when the user names none (``profile`` and the Profile
#: page): the sizes whose largest batch fits in the device's free memory.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True, order=True)
class DesignPoint:
    """One setting to measure: prompt tokens in, generated tokens out, and the requests of
    that shape run together in one trial (``batch_size``; 1: one request alone)."""

    input_tokens: int
    output_tokens: int
    batch_size: int = 1


@dataclass(frozen=True)
class Design:
    """The points of a job, and what was dropped from the asked-for design and why."""

    kind: str
    points: tuple[DesignPoint, ...]
    dropped: tuple[str, ...] = ()

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The distinct batch sizes of the points, ascending."""
        return tuple(sorted({p.batch_size for p in self.points}))

    def to_dict(self) -> dict:
        """Points as [τin, τout] (batch size 1, as stored before the batch axis) or [τin, τout, B]."""
        return {"kind": self.kind, "points": [[p.input_tokens, p.output_tokens] + ([p.batch_size] if p.batch_size != 1
                                                                                   else []) for p in self.points],
                "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, data: dict) -> "Design":
        return cls(kind=data["kind"], points=tuple(DesignPoint(*(int(v) for v in point)) for point in data["points"]),
                   dropped=tuple(data.get("dropped", ())))


def parse_token_list(text: str | list | tuple, where: str) -> list[int]:
    """``"8,32,128"`` (or a list) as sorted distinct positive token counts."""
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).replace(" ", "").split(",") if t]
    values, problems = [], []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            problems.append(Problem(where, f"{item!r} is not a number", None, "whole numbers of tokens >= 1, e.g. 8,32,128"))
            continue
        if not number.is_integer() or not 1 <= number <= MAX_TOKENS:
            problems.append(Problem(where, f"{item!r} is not a whole number of tokens from 1 to {MAX_TOKENS:,}", None,
                                    "whole numbers of tokens >= 1, e.g. 8,32,128"))
            continue
        values.append(int(number))
    if not values and not problems:
        problems.append(Problem(where, "is empty", None, "at least one token count, e.g. 8,32,128"))
    if problems:
        raise InputError(problems)
    return sorted(set(values))


def parse_batch_sizes(text: str | list | tuple, where: str = "batch sizes", max_batch_size: int | None = None
                      ) -> tuple[int, ...]:
    """``"1,4,16"`` (or a list) as sorted distinct batch sizes, or InputError with one problem per bad item.

    Each must be a whole number of requests from 1 to ``max_batch_size`` (default: the most
    one batch may hold, :data:`engine.backends.batch.MAX_BATCH_SIZE`); 0, negatives, ``2.5``
    and ``abc`` are refused by name. Whether a batch fits in a device's memory is checked
    where the model and the device are known (:func:`engine.profiling.jobs.prepare_job`).
    """
    from engine.backends.batch import MAX_BATCH_SIZE, check_batch_size

    limit = max_batch_size or MAX_BATCH_SIZE
    items = list(text) if isinstance(text, (list, tuple)) else [t.strip() for t in str(text).split(",")]
    values, problems = [], []
    for item in items:
        value = item
        if isinstance(item, str):
            stripped = item.strip()
            value = int(stripped) if stripped.lstrip("+-").isdigit() else stripped
        try:
            values.append(check_batch_size(value, limit, where))
        except InputError as exc:
            problems.extend(exc.problems)
    if not values and not problems:
        problems.append(Problem(where, "is empty", None, "one or more batch sizes, e.g. 1,4,16"))
    if problems:
        raise InputError(problems)
    return tuple(sorted(set(values)))


def build_design(kind: str = "quick", *, inputs: list[int] | None = None, outputs: list[int] | None = None,
                 n_points: int = 16, context_length: int | None = None, seed: int = 0,
                 batch_sizes: tuple[int, ...] | list[int] = (1,)) -> Design:
    """The design of the given kind, with points beyond ``context_length`` dropped (and named).

    ``inputs``/``outputs`` are the lists of ``custom`` and the ranges (min and max are
    used) of ``space-filling`` and ``adaptive``. ``batch_sizes`` crosses every (τin, τout)
    with each batch size (see the module docstring); the adaptive design takes 1 only.
    """
    if kind not in ALL_DESIGN_KINDS:
        raise InputError(Problem("design", f"unknown design {kind!r}", None, " or ".join(ALL_DESIGN_KINDS)))
    batch_sizes = parse_batch_sizes(batch_sizes)
    if kind == "adaptive" and batch_sizes != (1,):
        raise InputError(Problem("batch sizes", f"{', '.join(map(str, batch_sizes))}: the adaptive design measures "
                                 "one request at a time", None, "batch size 1 with the adaptive design, or a fixed "
                                 "design (quick, custom, ...) for a batch axis"))
    if kind == "quick":
        points = [DesignPoint(i, o) for i in QUICK_TOKENS for o in QUICK_TOKENS]
    elif kind == "paper-grid":
        points = [DesignPoint(i, o) for i in PAPER_POWERS for o in PAPER_POWERS]
    elif kind == "paper-sweeps":
        points = sorted({DesignPoint(i, 32) for i in PAPER_POWERS} | {DesignPoint(32, o) for o in PAPER_POWERS + (4096,)})
    elif kind == "custom":
        if not inputs or not outputs:
            raise InputError(Problem("inputs/outputs", "a custom design needs both lists", None,
                                     "e.g. inputs 8,32,128 and outputs 8,32"))
        points = [DesignPoint(i, o) for i in inputs for o in outputs]
    elif kind == "adaptive":
        levels_in, levels_out = log_levels(inputs or ADAPTIVE_INPUTS), log_levels(outputs or ADAPTIVE_OUTPUTS)
        if len(levels_in) < 2 or len(levels_out) < 2:
            raise InputError(Problem("inputs/outputs", "an adaptive design needs a range of input and of output token "
                                     "counts (a surface cannot be fitted to one value)", None,
                                     "two or more values each, e.g. inputs 8,256 and outputs 8,64"))
        points = [DesignPoint(i, o) for i in levels_in for o in levels_out]
    else:
        points = space_filling(inputs or [8, 2048], outputs or [8, 512], n_points, seed)
    dropped = []
    if context_length is not None:
        kept = [p for p in points if p.input_tokens + p.output_tokens <= context_length]
        dropped = [f"({p.input_tokens}, {p.output_tokens}): {p.input_tokens + p.output_tokens} tokens exceed the "
                   f"model's context of {context_length}" for p in points if p not in kept]
        points = kept
    points = [DesignPoint(p.input_tokens, p.output_tokens, size) for p in points for size in batch_sizes]
    if not points:
        raise InputError(Problem("design", "no point fits the model's context" if dropped else "has no points", None,
                                 f"points with input + output <= {context_length}" if context_length else "at least one point"))
    return Design(kind=kind, points=tuple(points), dropped=tuple(dropped))


def log_levels(values) -> list[int]:
    """Three levels spread evenly in log2 space over a range: its ends and their geometric mean (fewer when narrow)."""
    lo, hi = min(values), max(values)
    return sorted({int(lo), int(round(math.sqrt(lo * hi))), int(hi)})


def space_filling(inputs: list[int], outputs: list[int], n_points: int, seed: int) -> list[DesignPoint]:
    """A Latin hypercube in (log2 input, log2 output), rounded to whole tokens, without repeats."""
    if not 2 <= n_points <= 400:
        raise InputError(Problem("points", f"{n_points} points", None, "2 to 400 points for a space-filling design"))
    rng = np.random.default_rng(seed)
    lo_in, hi_in = math.log2(min(inputs)), math.log2(max(inputs))
    lo_out, hi_out = math.log2(min(outputs)), math.log2(max(outputs))
    strata = (np.arange(n_points) + rng.random((2, n_points))) / n_points
    strata[0] = rng.permutation(strata[0])
    strata[1] = rng.permutation(strata[1])
    ins = np.rint(2 ** (lo_in + strata[0] * (hi_in - lo_in))).astype(int)
    outs = np.rint(2 ** (lo_out + strata[1] * (hi_out - lo_out))).astype(int)
    return sorted({DesignPoint(int(i), int(o)) for i, o in zip(ins, outs)})


def run_order(points: tuple[DesignPoint, ...], seed: int) -> list[DesignPoint]:
    """The points in a seeded random order (as the paper did), the same on every resume."""
    order = np.random.default_rng(seed).permutation(len(points))
    return [points[i] for i in order]
