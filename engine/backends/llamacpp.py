"""llama-cpp-python backend: a ``.gguf`` file on ``cpu``, or offloaded to a GPU.

The file is validated with :func:`~engine.backends.gguf_check.inspect_gguf` first:
llama.cpp can abort the process on a corrupt file, and a clear sentence is better
than a dead worker.

Single requests (:meth:`LlamaCppBackend.generate`, :meth:`~LlamaCppBackend.generate_text`)
run through ``llama_cpp.Llama``. Batches (:meth:`~LlamaCppBackend.generate_batch`) run
through llama.cpp's own batch API in a second context over the same weights, one
sequence id per request (``Llama`` decodes one sequence only and does not pass
``n_seq_max`` to its context).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.base import (  # noqa: I001
    TextResult,
    FILLER_TEXT,
    Backend,
    GenerationResult,
    parse_device,
    prompt_ids,
    thread_counts,
)
from engine.backends.batch import (
    MAX_BATCH_SIZE,
    STOPPED_CAP,
    STOPPED_END,
    BatchRequest,
    BatchResult,
    ExactRequest,
    RequestResult,
    output_limit,
)
from engine.backends.gguf_check import GgufInfo, inspect_gguf
from engine.backends.memory import ModelMemory, gguf_model_memory
from engine.backends.tokens import GgufPromptTokenizer, llama_vocab
from engine.errors import (
    DeviceUnavailableError,
    InferenceError,
    InputError,
    ModelLoadError,
    Problem,
    TokenCountMismatchError,
)

DEFAULT_MAX_CONTEXT = 4096  # a larger KV cache costs memory the demo design never uses
DEFAULT_SEED = 1234  # greedy decoding ignores it; fixed anyway so no run draws entropy
DEFAULT_N_BATCH = 512  # llama-cpp-python's default
CONTEXT_PAD_TOKENS = 256  # llama.cpp rounds each sequence's share of a context up to a multiple of this
KV_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type is float16


class LlamaCppBackend(Backend):
    """A GGUF model run by llama-cpp-python.

    Options:
        n_ctx: context (KV cache) size in tokens; default the smaller of the model's
            trained context and 4096.
        n_threads: CPU threads for steps of one token (a single request's answer);
            default half the logical CPUs this process may use, at least 1
            (:func:`engine.backends.base.thread_counts`).
        n_threads_batch: CPU threads for steps of more than one token (prompts, and the
            decode steps of a batch); default as ``n_threads``.
        n_batch: prompt tokens per decode call; default 512 (llama-cpp-python's). Also
            bounds the batch size (one decode step holds one token per request).
        seed: sampler seed; default 1234.
    """

    name = "llama.cpp"

    def __init__(self, path: str | Path, device: str = "cpu", **options: Any) -> None:
        super().__init__(path, device, **options)
        if self.batch_size != 1:
            # The option batches generate() with llama-cpp-python's Llama, which decodes one sequence.
            raise InputError(Problem("batch_size", f"{self.batch_size} is not supported by the llama.cpp backend",
                                     None, "batch size 1 for .gguf models; batches of llama.cpp requests run "
                                           "through generate_batch"))
        self._llm: Any = None
        self.info: GgufInfo | None = None
        self._eog_ids: list[int] = []
        self._n_ctx = 0
        self._batch_context: _BatchContext | None = None

    # -- lifecycle -----------------------------------------------------------------
    def _gpu_settings(self) -> dict[str, Any]:
        import llama_cpp

        spec = parse_device(self.device)
        if spec.kind == "cpu":
            return {"n_gpu_layers": 0}
        if not llama_cpp.llama_supports_gpu_offload():
            raise DeviceUnavailableError(
                f"Device {self.device!r} is not available: this llama-cpp-python build has "
                "no GPU support. Use 'cpu', or rebuild it with "
                "CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall --no-cache-dir "
                "llama-cpp-python."
            )
        n_gpus = _gpu_device_count(llama_cpp)
        index = spec.index or 0
        if n_gpus is not None and index >= n_gpus:
            raise DeviceUnavailableError(
                f"Device {self.device!r} does not exist: llama.cpp sees {n_gpus} GPU(s)."
            )
        # All layers on the one chosen GPU: a profile is per device, not split.
        return {
            "n_gpu_layers": -1,
            "main_gpu": index,
            "split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE,
        }

    def load(self) -> None:
        """Validate the GGUF file, then load it with llama.cpp."""
        if self._loaded:
            return
        if self.path.is_dir():
            raise ModelLoadError(
                f"{self.path} is a directory; the llama.cpp backend needs a .gguf file "
                "(a Hugging Face model directory needs the transformers backend)."
            )
        info = inspect_gguf(self.path)
        gpu = self._gpu_settings()
        import llama_cpp

        trained = info.context_length or DEFAULT_MAX_CONTEXT
        n_ctx = int(self.options.get("n_ctx") or min(trained, DEFAULT_MAX_CONTEXT))
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": n_ctx,
            "n_batch": self._n_batch_option(),
            "seed": int(self.options.get("seed", DEFAULT_SEED)),
            "verbose": False,
            **gpu,
        }
        # Half the logical CPUs for every step (thread_counts says why, bench/threads.py measures it).
        kwargs["n_threads"], kwargs["n_threads_batch"] = thread_counts(self.options)
        try:
            llm = llama_cpp.Llama(**kwargs)
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError
            raise ModelLoadError(
                f"{self.path}: llama.cpp could not load the model ({exc}). The file passed the "
                "GGUF check, so its architecture or tensor types may be unsupported by "
                f"llama-cpp-python {llama_cpp.__version__}."
            ) from exc

        vocab = llama_vocab(llm)
        # Every end-of-generation token (EOS, EOT, ...), not only EOS: a server stops at
        # any of them, so a request of exactly τout tokens must never contain one.
        # (Llama.generate() itself does not stop at EOS; it would emit it and go on.)
        eog_ids = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        # Prompts, filler and real, start with BOS by the rule of engine/backends/tokens.py.
        tokens = GgufPromptTokenizer(llm)

        self._llm = llm
        self.info = info
        # llama.cpp pads the context up (to 256) and would accept requests past the
        # trained context; the limit is what was asked for.
        self._n_ctx = min(llm.n_ctx(), n_ctx)
        self._eog_ids = eog_ids
        self._tokens = tokens
        self._filler_ids = tokens.encode(FILLER_TEXT)
        self._loaded = True

    def close(self) -> None:
        """Free the llama.cpp model and its contexts."""
        if self._batch_context is not None:
            self._batch_context.close()
            self._batch_context = None
        if self._llm is not None:
            self._llm.close()
        self._llm = None
        super().close()

    # -- queries -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        self._ensure_loaded()
        return self._n_ctx

    @property
    def settings(self) -> dict[str, Any]:
        import llama_cpp

        self._ensure_loaded()
        return {
            **super().settings,
            "n_ctx": self._n_ctx,
            "n_threads": self._llm.n_threads,
            "n_threads_batch": self._llm.n_threads_batch,
            "n_batch": self._llm.n_batch,
            "file_type": self.info.file_type_name if self.info else None,
            "llama_cpp_python_version": llama_cpp.__version__,
        }

    def _n_batch_option(self) -> int:
        return int(self.options.get("n_batch") or DEFAULT_N_BATCH)

    @property
    def max_batch_size(self) -> int:
        """Most requests a batch takes: one decode step holds one token of each, so at most
        ``n_batch``, and at most the sequences llama.cpp allows in one context."""
        import llama_cpp

        return min(MAX_BATCH_SIZE, self._n_batch_option(), int(llama_cpp.llama_max_parallel_sequences()))

    def model_memory(self) -> ModelMemory | None:
        """Sizes from the GGUF header (read before loading when the model is not loaded)."""
        info = self.info
        if info is None:
            try:
                info = inspect_gguf(self.path)
            except ModelLoadError:
                return None  # load() will say what is wrong
        return gguf_model_memory(info, KV_ELEMENT_BYTES)

    def _memory_options(self, batch_size: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        return {"max_tokens_per_pass": self._n_batch_option(),
                "kv_tokens_per_request": _padded_context(input_tokens + output_tokens)}

    # -- requests ------------------------------------------------------------------
    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        """Run one greedy request of exactly ``input_tokens`` in, ``output_tokens`` out."""
        import llama_cpp

        self._ensure_loaded()
        self.check_request(input_tokens, output_tokens)
        input_tokens, output_tokens = int(input_tokens), int(output_tokens)
        ids = prompt_ids(self._filler_ids, self.prompt_tokenizer.bos_id, input_tokens)
        self.last_prompt_ids = ids
        eog_ids = np.asarray(self._eog_ids, dtype=np.intp)

        def suppress_eog(_input_ids: Any, scores: Any) -> Any:
            scores[eog_ids] = -np.inf
            return scores

        llama_cpp.llama_perf_context_reset(self._llm.ctx)
        output_ids, started, first_token_at, finished = self._timed_generate(
            ids, output_tokens, stop_ids=set(), logits_processor=llama_cpp.LogitsProcessorList([suppress_eog]))
        self.last_output_ids = output_ids
        got_in = self._read_back_input_tokens(len(output_ids))
        if got_in != input_tokens or len(output_ids) != output_tokens:
            raise TokenCountMismatchError(
                f"{self.path.name}: asked for {input_tokens} input and {output_tokens} output "
                f"tokens, llama.cpp processed {got_in} and generated {len(output_ids)}."
            )
        return GenerationResult(
            input_tokens=got_in,
            output_tokens=len(output_ids),
            runtime_s=finished - started,
            time_to_first_token_s=(first_token_at - started) if first_token_at else None,
        )

    def _timed_generate(self, ids: list[int], max_output_tokens: int, stop_ids: set[int],
                        logits_processor: Any = None) -> tuple[list[int], float, float | None, float]:
        """Greedy tokens for prompt ``ids``, up to ``max_output_tokens`` or through the first of ``stop_ids``.

        Returns the generated ids and when the request started, its first token arrived
        (``None`` without one) and it finished.
        """
        llm = self._llm
        # Forget the previous request: Llama.generate() would otherwise keep the KV
        # cache of the longest matching prefix (every prompt here starts with the
        # same filler) and skip most of the prefill, so profiling would under-measure.
        llm.reset()
        output_ids: list[int] = []
        first_token_at: float | None = None
        started = time.perf_counter()
        tokens = llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True,  # temp 0: greedy
                              logits_processor=logits_processor)
        try:
            for token in tokens:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                output_ids.append(int(token))
                if int(token) in stop_ids or len(output_ids) >= max_output_tokens:
                    break
        finally:
            tokens.close()
        return output_ids, started, first_token_at, time.perf_counter()

    def _read_back_input_tokens(self, generated: int) -> int:
        """Prompt tokens of the request just run, read back from llama.cpp itself.

        llama.cpp counts every token decoded since the perf reset: the prompt plus the
        ``generated`` tokens fed back, all but the last (which is never decoded).

        Raises:
            TokenCountMismatchError: part of the prompt came from a cache.
        """
        import llama_cpp

        llm = self._llm
        decoded = _decoded_tokens(llama_cpp.llama_perf_context(llm.ctx))
        if llm.n_tokens != decoded:
            raise TokenCountMismatchError(
                f"{self.path.name}: llama.cpp holds {llm.n_tokens} tokens in its context but "
                f"decoded {decoded}: part of the prompt came from a cache."
            )
        return decoded - (generated - 1)

    def generate_text(self, prompt: str, max_output_tokens: int) -> TextResult:
        """Answer ``prompt`` greedily, stopping at an end-of-generation token or the cap."""
        self._ensure_loaded()
        ids = self._prompt_ids(prompt, max_output_tokens)
        eog = set(self._eog_ids)
        output_ids, started, _, finished = self._timed_generate(ids, int(max_output_tokens), stop_ids=eog)
        stopped = "end of answer" if output_ids and output_ids[-1] in eog else "output cap"
        self.last_output_ids = output_ids
        text = self._llm.detokenize([t for t in output_ids if t not in eog]).decode("utf-8", errors="replace")
        return TextResult(text=text, input_tokens=len(ids), output_tokens=len(output_ids),
                          runtime_s=finished - started, stopped=stopped)

    def generate_batch(self, requests: Sequence[BatchRequest]) -> BatchResult:
        """Run the requests as one batch of llama.cpp sequences, one sequence id each.

        All prompts are decoded together (in passes of at most ``n_batch`` tokens), then
        each step decodes one token for every request still unfinished, picked greedily
        from its own logits (end-of-generation tokens masked for exact requests). A request
        that is done leaves the batch: llama.cpp needs no rectangle, so nothing is padded
        and no step is computed for a finished request, and :class:`RequestResult` reports
        zero waste (a real difference from transformers, where finished rows keep computing).
        The KV cache is cleared before each batch, so every prompt pays its full prefill.
        """
        import llama_cpp

        requests, ids_per_request = self.prepare_batch(requests)
        answers = _GreedyAnswers(requests, self._eog_ids)
        context = self._context_for(len(requests), max(map(len, ids_per_request)), max(answers.limits))
        llama_cpp.llama_memory_clear(context.memory, True)  # the previous batch, if any
        llama_cpp.llama_perf_context_reset(context.ctx)
        started = time.perf_counter()
        fed = self._prefill(context, ids_per_request, answers)
        first_token_at = time.perf_counter()
        steps = 1 + self._decode(context, ids_per_request, answers)
        finished = time.perf_counter()

        results = self._read_back_batch(context, requests, ids_per_request, fed, answers.outputs)
        self.last_batch_prompt_ids, self.last_batch_fed_ids = ids_per_request, fed
        self.last_batch_output_ids = answers.outputs
        return BatchResult(requests=results, runtime_s=finished - started,
                           time_to_first_token_s=first_token_at - started, decode_steps=steps)

    def _prefill(self, context: _BatchContext, ids_per_request: list[list[int]],
                 answers: _GreedyAnswers) -> list[list[int]]:
        """Decode every prompt token, in passes of at most ``n_batch``, and pick each request's
        first token from the logits of its prompt's last (the only logits asked for).

        Returns the ids placed in the batch for each sequence, in order.
        """
        tokens = [(sequence, position, token) for sequence, ids in enumerate(ids_per_request)
                  for position, token in enumerate(ids)]
        fed: list[list[int]] = [[] for _ in ids_per_request]
        for first in range(0, len(tokens), context.n_batch):
            chunk = tokens[first:first + context.n_batch]
            last_of = [position == len(ids_per_request[sequence]) - 1 for sequence, position, _ in chunk]
            context.decode(chunk, last_of, self.path.name)
            for index, ((sequence, _, token), wanted) in enumerate(zip(chunk, last_of, strict=True)):
                fed[sequence].append(token)
                if wanted:
                    answers.pick(sequence, context.logits(index))
        return fed

    def _decode(self, context: _BatchContext, ids_per_request: list[list[int]], answers: _GreedyAnswers) -> int:
        """Decode one token per unfinished request per step, at the position after its last,
        until every request is done; returns the steps run."""
        steps = 0
        while active := answers.active():
            step = [(sequence, len(ids_per_request[sequence]) + len(answers.outputs[sequence]) - 1,
                     answers.outputs[sequence][-1]) for sequence in active]
            context.decode(step, [True] * len(step), self.path.name)
            for index, sequence in enumerate(active):
                answers.pick(sequence, context.logits(index))
            steps += 1
        return steps

    def _context_for(self, batch_size: int, input_tokens: int, output_tokens: int) -> _BatchContext:
        """A batch context of exactly ``batch_size`` sequences, each with room for
        ``input_tokens`` + ``output_tokens`` (the longest prompt and answer of the batch).

        The last one is kept and reused when it has that shape (its memory is held already);
        otherwise it is freed first, then the new one is checked against free memory and made.
        """
        self._ensure_loaded()
        need = input_tokens + output_tokens
        current = self._batch_context
        if current is not None and current.n_seq_max == batch_size and current.n_ctx_seq >= need:
            return current
        if current is not None:
            current.close()
            self._batch_context = None
        self.check_batch_memory(batch_size, input_tokens, output_tokens)
        context = _BatchContext(self._llm, batch_size, _padded_context(need), self._n_batch_option(), self.path.name)
        # Freed with the model, before it, however the Llama goes (close() or garbage collection):
        # a context must never outlive the weights it points to.
        self._llm._stack.callback(context.close)
        self._batch_context = context
        return context

    def _read_back_batch(self, context: _BatchContext, requests: tuple[BatchRequest, ...],
                         ids_per_request: list[list[int]], fed: list[list[int]],
                         outputs: list[list[int]]) -> tuple[RequestResult, ...]:
        """Each request's result, checked against what llama.cpp holds and counted.

        Each sequence's cells run from position 0 to its prompt plus its answer less the
        last token (never decoded); llama.cpp's perf counters add up every token decoded.

        Raises:
            TokenCountMismatchError: a sequence holds other positions, llama.cpp decoded
                another total, an exact request got another count, or a prompt was fed
                other ids than its own.
        """
        import llama_cpp

        results: list[RequestResult] = []
        for number, (request, ids, answer) in enumerate(zip(requests, ids_per_request, outputs, strict=True),
                                                        start=1):
            sequence = number - 1
            low = llama_cpp.llama_memory_seq_pos_min(context.memory, sequence)
            high = llama_cpp.llama_memory_seq_pos_max(context.memory, sequence)
            got_in = high + 1 - (len(answer) - 1) if low == 0 else -1
            if fed[sequence] != ids or got_in != len(ids):
                raise TokenCountMismatchError(
                    f"{self.path.name}: request {number}: llama.cpp holds positions {low} to {high} for a prompt of "
                    f"{len(ids)} tokens and an answer of {len(answer)}; expected 0 to {len(ids) + len(answer) - 2}.")
            if isinstance(request, ExactRequest):
                if (got_in, len(answer)) != (request.input_tokens, request.output_tokens):
                    raise TokenCountMismatchError(
                        f"{self.path.name}: request {number}: asked for {request.input_tokens} input and "
                        f"{request.output_tokens} output tokens, llama.cpp processed {got_in} and generated "
                        f"{len(answer)}.")
                results.append(RequestResult(input_tokens=got_in, output_tokens=len(answer), stopped=STOPPED_CAP))
                continue
            ended = bool(answer) and answer[-1] in self._eog_set
            text = self._llm.detokenize([t for t in answer if t not in self._eog_set]).decode("utf-8",
                                                                                              errors="replace")
            results.append(RequestResult(input_tokens=got_in, output_tokens=len(answer), text=text,
                                         stopped=STOPPED_END if ended else STOPPED_CAP))
        decoded = _decoded_tokens(llama_cpp.llama_perf_context(context.ctx))
        expected = sum(len(ids) + len(answer) - 1 for ids, answer in zip(ids_per_request, outputs, strict=True))
        if decoded != expected:
            raise TokenCountMismatchError(
                f"{self.path.name}: llama.cpp decoded {decoded} tokens for a batch whose prompts and answers "
                f"need {expected}.")
        return tuple(results)

    @property
    def _eog_set(self) -> frozenset[int]:
        return frozenset(self._eog_ids)


class _GreedyAnswers:
    """The answers of a batch as they grow: each request's greedy tokens, and which requests are done.

    An exact request has its end-of-generation tokens masked and is done at its count; a
    prompt is done at an end-of-generation token (kept in its answer) or at its cap.
    """

    def __init__(self, requests: tuple[BatchRequest, ...], eog_ids: list[int]) -> None:
        self.limits = [output_limit(r) for r in requests]
        self.suppress = [isinstance(r, ExactRequest) for r in requests]
        self.eog_ids = np.asarray(eog_ids, dtype=np.intp)
        self.eog_set = frozenset(eog_ids)
        self.outputs: list[list[int]] = [[] for _ in requests]
        self.done = [False] * len(requests)

    def pick(self, sequence: int, logits: np.ndarray) -> None:
        """Append the greedy token of ``sequence`` from its ``logits``."""
        if self.suppress[sequence] and self.eog_ids.size:
            logits = logits.copy()  # a view of llama.cpp's buffer: leave it as it was
            logits[self.eog_ids] = -np.inf
        token = int(np.argmax(logits))
        self.outputs[sequence].append(token)
        ended = not self.suppress[sequence] and token in self.eog_set
        self.done[sequence] = ended or len(self.outputs[sequence]) >= self.limits[sequence]

    def active(self) -> list[int]:
        """The sequences still generating."""
        return [sequence for sequence, done in enumerate(self.done) if not done]


class _BatchContext:
    """A llama.cpp context for batches: ``n_seq_max`` sequences over the loaded model's weights.

    Made with the ``Llama`` context's settings (threads, attention kernel, KV cache type),
    so a batch computes as a single request does, except for the number of sequences and
    the context size. Each sequence has its own cache stream (``kv_unified`` off, llama.cpp's
    default): its attention reads its own tokens only, and its share of the context is
    ``n_ctx_seq`` cells.
    """

    def __init__(self, llm: Any, n_seq_max: int, n_ctx_seq: int, n_batch: int, model_name: str) -> None:
        import llama_cpp

        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = n_seq_max
        params.n_ctx = n_seq_max * n_ctx_seq
        params.n_batch = max(n_batch, n_seq_max)
        params.n_ubatch = min(params.n_batch, llm.context_params.n_ubatch)
        params.kv_unified = False
        params.no_perf = False  # the read-back counts decoded tokens
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)  # no public accessor for the model
        if not self.ctx:
            raise InferenceError(
                f"{model_name}: llama.cpp could not make a context for a batch of {n_seq_max} sequences of "
                f"{n_ctx_seq} tokens (out of memory?); use a smaller batch or shorter requests.")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(self.ctx))
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        # llama.cpp may lower n_batch (to the context size); a decode call past it aborts the process.
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))
        self.n_vocab = int(llm.n_vocab())
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def decode(self, tokens: list[tuple[int, int, int]], logits: list[bool], model_name: str) -> None:
        """Decode ``(sequence, position, token)`` triples in one call; ``logits[i]``: keep token i's logits.

        Raises:
            InferenceError: llama.cpp refused or failed the batch.
        """
        import llama_cpp

        if len(tokens) > self.n_batch:  # llama.cpp would abort the whole process
            raise InferenceError(f"{model_name}: {len(tokens)} tokens in one decode call exceed n_batch "
                                 f"{self.n_batch}.")
        batch = self._batch
        for index, ((sequence, position, token), wanted) in enumerate(zip(tokens, logits, strict=True)):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = wanted
        batch.n_tokens = len(tokens)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            reason = {1: "no room left in the KV cache", 2: "aborted"}.get(status, "an error")
            raise InferenceError(f"{model_name}: llama.cpp could not decode a batch of {len(tokens)} tokens "
                                 f"(llama_decode returned {status}: {reason}).")

    def logits(self, output_index: int) -> np.ndarray:
        """The logits of output ``output_index`` of the last decode call: a view, valid until the next call."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, output_index), shape=(self.n_vocab,))

    def close(self) -> None:
        """Free the batch and the context (the model stays loaded)."""
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


def _padded_context(tokens: int) -> int:
    """``tokens`` rounded up to llama.cpp's context granularity (:data:`CONTEXT_PAD_TOKENS`)."""
    return -(-tokens // CONTEXT_PAD_TOKENS) * CONTEXT_PAD_TOKENS


def _decoded_tokens(perf: Any) -> int:
    """Tokens decoded since the last perf reset: prompt batches plus single tokens.

    llama.cpp reports each counter as max(1, n) (to spare its printout a division by
    zero), so a counter whose time is zero is really zero.
    """
    prompt = int(perf.n_p_eval) if perf.t_p_eval_ms > 0 else 0
    single = int(perf.n_eval) if perf.t_eval_ms > 0 else 0
    return prompt + single


def _gpu_device_count(llama_cpp: Any) -> int | None:
    """GPUs llama.cpp's backends can see, or ``None`` when this build cannot say."""
    try:
        count = 0
        for i in range(llama_cpp.ggml_backend_dev_count()):
            dev = llama_cpp.ggml_backend_dev_get(i)
            if llama_cpp.ggml_backend_dev_type(dev) == llama_cpp.GGML_BACKEND_DEVICE_TYPE_GPU:
                count += 1
        return count
    except AttributeError:
        return None

