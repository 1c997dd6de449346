"""Batches of requests: what a backend is asked to run together, and what came back.

A batch holds one or more requests, each of one of two kinds:

* :class:`ExactRequest` (profiling): exactly ``input_tokens`` prompt ids built from the
  filler (the rule of :func:`engine.backends.base.prompt_ids`) and exactly
  ``output_tokens`` generated tokens, every end-of-generation token suppressed;
* :class:`PromptRequest` (execution): a real prompt, answered greedily until an
  end-of-generation token or ``max_output_tokens``.

A :class:`BatchResult` gives per request the tokens the model ran (read back from the
library), and for the whole batch its wall time and its **waste**: the computation spent
on nobody's answer, counted rather than hidden, because it is what batching costs:

* ``wasted_decode_tokens``: generation steps the batch ran for a request after that
  request had its answer (a request of 8 output tokens inside a batch that decodes 32
  steps wastes 24);
* ``padding_tokens``: positions filled with padding so that prompts of different lengths
  form one rectangular batch (transformers pads on the left).

Backends that drop a finished request from the batch and need no padding (llama.cpp)
report zero for both, and say why.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import InputError, Problem

#: Most requests one batch may hold (a backend may allow fewer, see ``Backend.max_batch_size``).
MAX_BATCH_SIZE = 256

#: How a request's answer ended: at an end-of-generation token the model chose...
STOPPED_END = "end of answer"
#: ...or at its cap (an :class:`ExactRequest` always ends here: its end-of-generation tokens are suppressed).
STOPPED_CAP = "output cap"


@dataclass(frozen=True)
class ExactRequest:
    """A profiling request: exactly ``input_tokens`` in (filler), exactly ``output_tokens`` out."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class PromptRequest:
    """An execution request: ``prompt`` answered greedily, at most ``max_output_tokens`` tokens.

    The answer may end earlier, at an end-of-generation token, as it would in service.
    """

    prompt: str
    max_output_tokens: int


BatchRequest = ExactRequest | PromptRequest


@dataclass(frozen=True)
class RequestResult:
    """One request of a batch, as the model ran it.

    Attributes:
        input_tokens: prompt tokens the model ran for this request (BOS included when the
            model has one), read back from the library; padding is not counted here.
        output_tokens: tokens generated for this request, an end-of-generation token it
            stopped at included.
        stopped: :data:`STOPPED_END` or :data:`STOPPED_CAP`.
        text: the decoded answer of a :class:`PromptRequest` (without the end-of-generation
            token); ``None`` for an :class:`ExactRequest`.
        wasted_decode_tokens: generation steps the batch ran for this request after it was
            finished (``decode_steps - output_tokens`` where finished rows keep computing).
        padding_tokens: padding positions run before this request's prompt.
    """

    input_tokens: int
    output_tokens: int
    stopped: str
    text: str | None = None
    wasted_decode_tokens: int = 0
    padding_tokens: int = 0


@dataclass(frozen=True)
class BatchResult:
    """What a batch cost and what each of its requests got.

    Attributes:
        requests: one :class:`RequestResult` per request, in the order asked.
        runtime_s: wall-clock seconds of the whole batch, from handing the prompts to the
            library to the last token of the last request.
        time_to_first_token_s: wall-clock seconds from the start to the moment every
            request has its first token (the batch's prefill plus one step), or ``None``
            when the backend cannot observe it.
        decode_steps: generation steps the batch ran: the most tokens any request generated.
    """

    requests: tuple[RequestResult, ...]
    runtime_s: float
    time_to_first_token_s: float | None
    decode_steps: int

    @property
    def batch_size(self) -> int:
        """Requests in the batch."""
        return len(self.requests)

    @property
    def input_tokens(self) -> int:
        """Prompt tokens of all requests (padding not included)."""
        return sum(r.input_tokens for r in self.requests)

    @property
    def output_tokens(self) -> int:
        """Generated tokens of all requests (waste not included)."""
        return sum(r.output_tokens for r in self.requests)

    @property
    def wasted_decode_tokens(self) -> int:
        """Token computations of finished requests that kept running in the batch."""
        return sum(r.wasted_decode_tokens for r in self.requests)

    @property
    def padding_tokens(self) -> int:
        """Padding positions the batch ran."""
        return sum(r.padding_tokens for r in self.requests)

    @property
    def waste_tokens(self) -> int:
        """All token computations that served no request: finished rows plus padding."""
        return self.wasted_decode_tokens + self.padding_tokens


def _is_whole(value: object) -> bool:
    # numbers.Integral: a design built with numpy hands in numpy integers; bool is not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_batch_size(value: object, max_batch_size: int = MAX_BATCH_SIZE, where: str = "batch_size") -> int:
    """``value`` as a batch size (an int from 1 to ``max_batch_size``), or :class:`InputError` saying why not."""
    expected = f"a whole number of requests from 1 to {max_batch_size}"
    if not _is_whole(value):
        message = f"{value!r} is not a whole number of requests"
    elif value < 1:
        message = f"{value} is not allowed: a batch holds at least one request"
    elif value > max_batch_size:
        message = f"{value} is more than the {max_batch_size} requests one batch may hold here"
    else:
        return int(value)
    raise InputError(Problem(where, message, None, expected))


def check_batch(requests: Sequence[BatchRequest], max_batch_size: int = MAX_BATCH_SIZE) -> tuple[BatchRequest, ...]:
    """The requests as a tuple, after checking the batch's size and each request's fields.

    Counts become plain ``int`` (numpy integers are accepted). The context length is
    checked by the backend, which knows it.

    Raises:
        InputError: one :class:`Problem` per thing wrong (the batch is empty or too
            large, a request is of an unknown kind, a count is not a whole number >= 1,
            a prompt is not text).
    """
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise InputError(Problem("batch", f"{type(requests).__name__} is not a sequence of requests", None,
                                 "a list of ExactRequest or PromptRequest"))
    if len(requests) == 0:
        raise InputError(Problem("batch", "is empty", None, f"1 to {max_batch_size} requests"))
    check_batch_size(len(requests), max_batch_size, where="batch")
    problems: list[Problem] = []
    checked: list[BatchRequest] = []
    for number, request in enumerate(requests, start=1):
        where = f"request {number}"
        if isinstance(request, ExactRequest):
            fields = {"input_tokens": request.input_tokens, "output_tokens": request.output_tokens}
        elif isinstance(request, PromptRequest):
            fields = {"max_output_tokens": request.max_output_tokens}
            if not isinstance(request.prompt, str):
                problems.append(Problem(where, f"prompt {request.prompt!r} is not text", "prompt", "a string"))
        else:
            problems.append(Problem(where, f"{type(request).__name__} is not a request", None,
                                    "an ExactRequest or a PromptRequest"))
            continue
        bad = [Problem(where, f"{value!r} is not allowed", field, "a whole number of tokens >= 1")
               for field, value in fields.items() if not _is_whole(value) or value < 1]
        problems.extend(bad)
        if not bad and isinstance(request, ExactRequest):
            checked.append(ExactRequest(int(request.input_tokens), int(request.output_tokens)))
        elif not bad:
            checked.append(PromptRequest(request.prompt, int(request.max_output_tokens)))
    if problems:
        raise InputError(problems)
    return tuple(checked)


def output_limit(request: BatchRequest) -> int:
    """Most tokens a request may generate: its exact count, or its cap."""
    return request.output_tokens if isinstance(request, ExactRequest) else request.max_output_tokens
