"""The one interface every inference backend implements.

A profiling trial needs three things from a backend: a request with *exactly* the
asked-for number of prompt and generated tokens, the wall time it took, and proof
that the counts were honoured. :class:`Backend` fixes that contract; ``hf.py`` and
``llamacpp.py`` implement it for transformers and llama-cpp-python.

Every request a backend runs:

* has exactly ``input_tokens`` prompt tokens, built from :data:`FILLER_TEXT`
  tokenised by the model's own tokenizer (the first one is the model's BOS token
  when it defines one, as in a real request; the rest is filler, repeated and cut
  to length, with no other special tokens: the rule of
  :mod:`engine.backends.tokens`, which real prompts follow too);
* generates exactly ``output_tokens`` tokens, greedily, with every end-of-generation
  token suppressed so the model cannot stop early;
* runs with the KV cache on and *no* reuse of a previous request's prompt cache: every
  request pays its full prefill, as a request from a new user would (reusing the cache
  would make profiling under-measure prefill);
* reads the processed token counts back from the library and raises
  :class:`~engine.errors.TokenCountMismatchError` when they differ from the request.

:meth:`Backend.generate` runs one such request (or ``batch_size`` identical ones, the
older option); :meth:`Backend.generate_batch` runs several requests together, each with
its own counts or its own prompt (:mod:`engine.backends.batch`), after checking that the
batch fits in the device's memory (:mod:`engine.backends.memory`).
"""

from __future__ import annotations

import abc
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.backends.batch import (
    MAX_BATCH_SIZE,
    BatchRequest,
    BatchResult,
    ExactRequest,
    check_batch,
    check_batch_size,
    output_limit,
)
from engine.backends.tokens import PromptTokenizer, bos_prefix
from engine.errors import DeviceUnavailableError, InputError, Problem

if TYPE_CHECKING:
    from engine.backends.memory import BatchMemoryEstimate, ModelMemory

# Plain prose, tokenised once per backend and repeated to any prompt length. Fixed so
# that a point (τin, τout) means the same request on every run and every host.
FILLER_TEXT = (
    "The planner measures how much energy each model spends on a request. "
    "A request has a prompt and an answer; the prompt is read at once, the answer "
    "is written one token at a time. Long prompts cost prefill, long answers cost "
    "decode, and both cost more on a larger model. The measurements are repeated "
    "until the mean is known well enough, and every number keeps its source. "
)


@dataclass(frozen=True)
class GenerationResult:
    """What one request cost and what the backend actually processed.

    Attributes:
        input_tokens: prompt tokens the backend processed, read back from it.
        output_tokens: tokens the backend generated, read back from it.
        runtime_s: wall-clock seconds of the whole request, prefill plus decode,
            from handing the prompt ids to the library to receiving the last token.
        time_to_first_token_s: wall-clock seconds from the start of the request to
            the first generated token (prefill plus one sampling step), or ``None``
            when the backend cannot observe it.
        batch_size: identical requests run together; the token counts are per request,
            the runtime (and any energy measured around it) covers the whole batch.
    """

    input_tokens: int
    output_tokens: int
    runtime_s: float
    time_to_first_token_s: float | None
    batch_size: int = 1


@dataclass(frozen=True)
class TextResult:
    """One real request from a prompt: what came back and what it cost.

    ``input_tokens`` counts the prompt as the model ran it (BOS included when the model has
    one); ``output_tokens`` the tokens generated (the answer may stop early at an
    end-of-generation token, or at the cap); ``text`` the decoded answer.
    """

    text: str
    input_tokens: int
    output_tokens: int
    runtime_s: float
    stopped: str  # "end of answer" | "output cap"


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device string: ``kind`` is ``"cpu"`` or ``"cuda"``; ``index`` the GPU."""

    kind: str
    index: int | None = None


_CUDA_RE = re.compile(r"^(cuda|gpu)(?::(\d+))?$")


def parse_device(device: str) -> DeviceSpec:
    """Parse ``cpu``, ``cuda``, ``cuda:N`` (``gpu``/``gpu:N`` are accepted aliases).

    Raises:
        DeviceUnavailableError: for any other string.
    """
    text = str(device).strip().lower()
    if text == "cpu":
        return DeviceSpec("cpu")
    match = _CUDA_RE.match(text)
    if match:
        return DeviceSpec("cuda", int(match.group(2)) if match.group(2) else None)
    raise DeviceUnavailableError(
        f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N' (N = GPU index)."
    )


class Backend(abc.ABC):
    """An inference engine serving one model on one device.

    ``__init__`` only stores parameters; :meth:`load` does the work and reports a
    bad path, file or device. :meth:`generate`, :meth:`count_tokens` and
    :attr:`context_length` load the model on first use when :meth:`load` was not
    called. Not thread-safe: one backend serves one request at a time.
    """

    #: Backend name as stored in the catalog: ``"transformers"`` or ``"llama.cpp"``.
    name: str = ""

    def __init__(self, path: str | Path, device: str = "cpu", **options: Any) -> None:
        self.path = Path(path)
        self.device = device
        self.options = dict(options)
        #: Identical requests run together by :meth:`generate` (the older way to batch; a
        #: backend may refuse > 1 here and batch through :meth:`generate_batch` only).
        self.batch_size = check_batch_size(self.options.pop("batch_size", 1))
        #: Token ids fed to the model as the latest request's prompt (one of a batch), for inspection.
        self.last_prompt_ids: list[int] = []
        #: Token ids generated by the latest request, for inspection (tests, debugging).
        self.last_output_ids: list[int] = []
        #: Per request of the latest batch: its own prompt ids, the ids the library was fed for
        #: it (with any padding), and its generated ids (cut to its answer), for inspection.
        self.last_batch_prompt_ids: list[list[int]] = []
        self.last_batch_fed_ids: list[list[int]] = []
        self.last_batch_output_ids: list[list[int]] = []
        #: The model's tokenizer as prompts use it, and the filler's ids in it; set by :meth:`load`.
        self._tokens: PromptTokenizer | None = None
        self._filler_ids: list[int] = []
        self._loaded = False

    # -- lifecycle -----------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> None:
        """Load tokenizer and weights onto the device.

        Raises:
            ModelLoadError: the path is missing or is not a model this backend reads.
            DeviceUnavailableError: the device does not exist or cannot be used.
        """

    def close(self) -> None:
        """Free the model; the backend can be loaded again afterwards."""
        self._tokens = None
        self._loaded = False

    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    # -- queries -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Most tokens (prompt plus generated) one request may hold."""

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` has in this model's tokenizer, no special tokens."""
        return len(self.prompt_tokenizer.encode(text))

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """The tokenizer this backend builds prompts with (loads the model on first use)."""
        self._ensure_loaded()
        if self._tokens is None:
            raise RuntimeError(f"{type(self).__name__}.load() set no prompt tokenizer")
        return self._tokens

    @property
    def settings(self) -> dict[str, Any]:
        """The settings a measurement depends on (threads, dtype, ...), for provenance."""
        return {"backend": self.name, "device": self.device, "batch_size": self.batch_size}

    @property
    def max_batch_size(self) -> int:
        """Most requests :meth:`generate_batch` takes at once."""
        return MAX_BATCH_SIZE

    def model_memory(self) -> ModelMemory | None:
        """The sizes this model's memory need is made of, or ``None`` when unknown (no check then)."""
        return None

    # -- requests ------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        """Run one request of exactly ``input_tokens`` in and ``output_tokens`` out.

        Raises:
            InputError: a count is not a positive integer, or the two together
                exceed :attr:`context_length`.
            TokenCountMismatchError: the library processed other counts than asked.
        """

    def generate_text(self, prompt: str, max_output_tokens: int) -> TextResult:
        """Answer a real prompt greedily, at most ``max_output_tokens`` tokens (execution).

        Unlike :meth:`generate`, the answer may end early, as it would in service.
        """
        raise NotImplementedError(f"{self.name} cannot answer text prompts")

    @abc.abstractmethod
    def generate_batch(self, requests: Sequence[BatchRequest]) -> BatchResult:
        """Run ``requests`` together, greedily, and say what each got and what the batch cost.

        An :class:`~engine.backends.batch.ExactRequest` is held to its exact counts as in
        :meth:`generate`; a :class:`~engine.backends.batch.PromptRequest` is answered as in
        :meth:`generate_text`. The batch is refused before it runs when it does not fit in
        the device's free memory (:meth:`check_batch_memory`).

        Raises:
            InputError: the batch is empty or larger than :attr:`max_batch_size`, a request
                is malformed or exceeds :attr:`context_length`, or the batch does not fit.
            TokenCountMismatchError: the library processed other counts than asked.
        """

    def estimate_batch_memory(self, batch_size: int, input_tokens: int,
                              output_tokens: int) -> BatchMemoryEstimate | None:
        """What a batch of ``batch_size`` × (``input_tokens`` + ``output_tokens``) still needs to allocate,
        or ``None`` when this model's sizes are unknown."""
        from engine.backends.memory import estimate_batch_memory  # memory.py imports this module

        model = self.model_memory()
        if model is None:
            return None
        return estimate_batch_memory(model, batch_size, input_tokens, output_tokens, weights_loaded=self._loaded,
                                     **self._memory_options(batch_size, input_tokens, output_tokens))

    def _memory_options(self, batch_size: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        """Backend-specific options of :func:`~engine.backends.memory.estimate_batch_memory`."""
        return {}

    def check_batch_memory(self, batch_size: int, input_tokens: int, output_tokens: int,
                           free_bytes: int | None = None) -> None:
        """Refuse, with the numbers, a batch that does not fit in the device's free memory.

        ``input_tokens`` and ``output_tokens`` are the longest prompt and answer of the
        batch. ``free_bytes`` defaults to what the device reports now.

        Raises:
            InputError: the estimate exceeds the free memory.
        """
        from engine.backends.memory import check_batch_fits, free_memory_bytes, largest_fitting_batch

        estimate = self.estimate_batch_memory(batch_size, input_tokens, output_tokens)
        if estimate is None:
            return
        free = free_memory_bytes(self.device) if free_bytes is None else free_bytes
        if free is None or estimate.total_bytes <= free:
            return
        model = self.model_memory()
        fitting = largest_fitting_batch(model, input_tokens, output_tokens, free, batch_size - 1,
                                        weights_loaded=self._loaded,
                                        **self._memory_options(batch_size, input_tokens, output_tokens))
        check_batch_fits(estimate, free, self.device, fitting)

    def prepare_batch(self, requests: Sequence[BatchRequest]) -> tuple[tuple[BatchRequest, ...], list[list[int]]]:
        """The checked requests of a batch (:func:`~engine.backends.batch.check_batch`) and each one's prompt ids.

        An exact request's ids are the filler's (:func:`prompt_ids`), a prompt's those of
        :meth:`PromptTokenizer.prompt_ids`; each request must fit in :attr:`context_length`.

        Raises:
            InputError: naming every problem, each request by its number.
        """
        requests = check_batch(requests, self.max_batch_size)
        self._ensure_loaded()
        problems: list[Problem] = []
        ids_per_request: list[list[int]] = []
        for number, request in enumerate(requests, start=1):
            if isinstance(request, ExactRequest):
                ids = prompt_ids(self._filler_ids, self.prompt_tokenizer.bos_id, request.input_tokens)
            else:
                ids = self.prompt_tokenizer.prompt_ids(request.prompt)
            ids_per_request.append(ids)
            if not ids:
                problems.append(Problem(f"request {number}", "the prompt has no tokens and the model no BOS token",
                                        "prompt", "a prompt with some text"))
                continue
            try:
                self.check_request(len(ids), output_limit(request))
            except InputError as exc:
                problems += [Problem(f"request {number}: {p.where}", p.message, p.column, p.expected)
                             for p in exc.problems]
        if problems:
            raise InputError(problems)
        return requests, ids_per_request

    def _prompt_ids(self, prompt: str, max_output_tokens: int) -> list[int]:
        """The ids of a real prompt (:meth:`PromptTokenizer.prompt_ids`), checked against the context.

        Also kept as :attr:`last_prompt_ids`.
        """
        ids = self.prompt_tokenizer.prompt_ids(prompt)
        self.check_request(max(len(ids), 1), int(max_output_tokens))
        self.last_prompt_ids = ids
        return ids

    def check_request(self, input_tokens: int, output_tokens: int) -> None:
        """Raise :class:`InputError` naming every problem with a (τin, τout) request."""
        problems: list[Problem] = []
        for field, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            # numbers.Integral: a design built with numpy hands in numpy integers.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                problems.append(
                    Problem(where=field, message=f"{value!r} is not allowed",
                            expected="a whole number of tokens >= 1")
                )
        if not problems and int(input_tokens) + int(output_tokens) > self.context_length:
            problems.append(
                Problem(
                    where="input_tokens + output_tokens",
                    message=(
                        f"{input_tokens} + {output_tokens} = {input_tokens + output_tokens} "
                        f"tokens exceeds the context length of {self.context_length} tokens "
                        f"of {self.path.name}"
                    ),
                    expected=f"at most {self.context_length} tokens in total",
                )
            )
        if problems:
            raise InputError(problems)


def prompt_ids(filler_ids: list[int], bos_id: int | None, input_tokens: int) -> list[int]:
    """Exactly ``input_tokens`` prompt ids: BOS (when the model has one) then filler.

    The filler ids are repeated and cut, so the prompt is the same for a given
    length on every run.
    """
    if not filler_ids:
        raise ValueError("the filler text tokenised to nothing")
    head = bos_prefix(bos_id)
    need = input_tokens - len(head)
    repeats = -(-need // len(filler_ids)) if need > 0 else 0
    return (head + filler_ids * repeats)[:input_tokens]


def thread_counts(options: dict[str, Any], allowed: int | None = None) -> tuple[int, int]:
    """``(n_threads, n_threads_batch)``: the options' (``n_threads`` stands for both when it is
    the only one given), else half the logical CPUs this process may use (at least 1) for both.

    Half, not all: on this project's 2-CPU VM (``bench/threads.py``) one thread used 40% less
    CPU time than two on a single request's answer (llama.cpp) and 25% less (torch), in the
    same or less wall time, and its CPU time did not move with what else ran; two threads
    spent a varying share synchronising. Steps of one token and of many use the same count,
    so that cost changes smoothly with the batch size. ``allowed`` defaults to this process's
    CPU affinity.
    """
    if allowed is None:
        from engine.energy.estimate import logical_cpu_count

        allowed = logical_cpu_count()
    half = max(int(allowed) // 2, 1)
    given, given_batch = options.get("n_threads"), options.get("n_threads_batch")
    n_threads = int(given) if given else half
    n_threads_batch = int(given_batch) if given_batch else (int(given) if given else half)
    return n_threads, n_threads_batch
