"""transformers backend: a Hugging Face model directory on ``cpu`` or ``cuda[:N]``.

Only local directories are read (``local_files_only=True``, ``HF_HUB_OFFLINE=1``):
profiling must never wait on, or silently depend on, a model hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.backends.base import (  # noqa: I001
    TextResult,
    FILLER_TEXT,
    Backend,
    GenerationResult,
    parse_device,
    thread_counts,
)
from engine.backends.batch import (
    STOPPED_CAP,
    STOPPED_END,
    BatchRequest,
    BatchResult,
    ExactRequest,
    PromptRequest,
    RequestResult,
    output_limit,
)
from engine.backends.memory import ModelMemory, hf_model_memory
from engine.backends.tokens import HfPromptTokenizer, open_hf_tokenizer
from engine.errors import DeviceUnavailableError, ModelLoadError, TokenCountMismatchError

DTYPES = ("auto", "float32", "float16", "bfloat16")


def count_safetensors_params(model_dir: str | Path) -> int:
    """Parameters stored in the ``*.safetensors`` files of a model directory.

    Reads only each file's JSON header (the first few KB), never the weights.

    Raises:
        ModelLoadError: there is no safetensors file, or a header is unreadable.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weight files found.")
    total = 0
    for file in files:
        try:
            with file.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
        except (OSError, struct.error, ValueError) as exc:
            raise ModelLoadError(f"{file}: unreadable safetensors header ({exc}).") from None
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


class TransformersBackend(Backend):
    """A causal LM loaded with ``AutoModelForCausalLM`` from a local directory.

    Options:
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"float16"`` or
            ``"bfloat16"``. Default ``float32`` on CPU (half precision is slow or
            unsupported there) and ``auto`` on CUDA.
        trust_remote_code: run code shipped with the model; default ``False``.
        n_threads: torch's CPU threads (process-wide, set at load on the CPU); default
            half the logical CPUs this process may use, at least 1, as llama.cpp's
            (:func:`engine.backends.base.thread_counts`).
    """

    name = "transformers"

    def __init__(self, path: str | Path, device: str = "cpu", **options: Any) -> None:
        super().__init__(path, device, **options)
        self._model: Any = None
        self._tokenizer: Any = None
        self._torch_device: str = "cpu"
        self._context_length = 0

    # -- lifecycle -----------------------------------------------------------------
    def _threads_option(self) -> int:
        threads, _ = thread_counts({"n_threads": self.options.get("n_threads")})
        return threads

    def _resolve_device(self) -> str:
        import torch

        spec = parse_device(self.device)
        if spec.kind == "cpu":
            return "cpu"
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus == 0:
            build = "a CPU-only torch build" if torch.version.cuda is None else "torch"
            raise DeviceUnavailableError(
                f"Device {self.device!r} is not available: this host has no CUDA GPU "
                f"visible to {build}. Use 'cpu'."
            )
        index = spec.index or 0
        if index >= n_gpus:
            raise DeviceUnavailableError(
                f"Device {self.device!r} does not exist: this host has {n_gpus} CUDA "
                f"GPU(s), cuda:0 to cuda:{n_gpus - 1}."
            )
        return f"cuda:{index}"

    def _resolve_dtype(self, torch_device: str) -> Any:
        import torch

        dtype = self.options.get("dtype") or ("float32" if torch_device == "cpu" else "auto")
        if dtype not in DTYPES:
            raise ModelLoadError(
                f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}."
            )
        return "auto" if dtype == "auto" else getattr(torch, dtype)

    def load(self) -> None:
        """Load tokenizer and model from the local directory onto the device."""
        if self._loaded:
            return
        # No hub: a missing file must fail here, not trigger a download attempt.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = self.path
        if not path.exists():
            raise ModelLoadError(f"{path} does not exist; give a Hugging Face model directory.")
        if not path.is_dir():
            raise ModelLoadError(
                f"{path} is not a directory; the transformers backend needs a Hugging Face "
                "model directory (with config.json), a .gguf file needs the llama.cpp backend."
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a Hugging Face model directory: it has no config.json."
            )
        torch_device = self._resolve_device()
        dtype = self._resolve_dtype(torch_device)
        trust_remote_code = bool(self.options.get("trust_remote_code", False))

        import torch
        from transformers import AutoModelForCausalLM

        if torch_device == "cpu":
            torch.set_num_threads(self._threads_option())
        try:
            tokenizer = open_hf_tokenizer(path, trust_remote_code)
        except Exception as exc:  # transformers raises many kinds; all mean "cannot load"
            raise ModelLoadError(f"{path}: the tokenizer could not be loaded ({brief_error(exc)}).") from exc
        try:
            with quiet_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype
                )
            model.to(torch_device)
            model.eval()
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(
                f"{path}: the model does not fit in the memory of {torch_device} ({brief_error(exc)})."
            ) from exc
        except Exception as exc:
            raise ModelLoadError(f"{path}: the model could not be loaded ({brief_error(exc)}).") from exc

        tokens = HfPromptTokenizer(tokenizer)
        context = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(context, int) or context <= 0:
            context = tokenizer.model_max_length
        if not isinstance(context, int) or context <= 0 or context > 10**7:
            raise ModelLoadError(f"{path}: the model config states no context length.")
        self._model, self._tokenizer, self._tokens = model, tokenizer, tokens
        self._torch_device = torch_device
        self._filler_ids = tokens.encode(FILLER_TEXT)
        self._context_length = context
        self._loaded = True

    def close(self) -> None:
        """Drop the model and, on CUDA, return its memory to the driver."""
        on_cuda = self._torch_device.startswith("cuda")
        self._model = None
        self._tokenizer = None
        super().close()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    # -- queries -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        self._ensure_loaded()
        return self._context_length

    @property
    def settings(self) -> dict[str, Any]:
        import torch

        self._ensure_loaded()
        return {
            **super().settings,
            "dtype": str(self._model.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }

    @property
    def eog_ids(self) -> list[int]:
        """The end-of-generation ids of the model's generation config (an answer stops at any of them)."""
        self._ensure_loaded()
        eos = self._model.generation_config.eos_token_id
        return sorted(set(eos if isinstance(eos, list) else [eos])) if eos is not None else []

    def model_memory(self) -> ModelMemory | None:
        """Sizes from the loaded model (its parameters and dtype), or before loading from
        ``config.json`` and the safetensors headers in the dtype it will load in."""
        import torch

        if self._loaded:
            model = self._model
            weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            return hf_model_memory(model.config.to_dict(), weights, model.dtype.itemsize)
        try:
            config = json.loads((self.path / "config.json").read_text())
            n_params = count_safetensors_params(self.path)
            dtype = self._resolve_dtype(self._resolve_device())
        except (OSError, ValueError, ModelLoadError, DeviceUnavailableError):
            return None  # load() will say what is wrong
        if dtype == "auto":
            dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
        return hf_model_memory(config, n_params * dtype.itemsize, dtype.itemsize)

    # -- requests ------------------------------------------------------------------
    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        """Run one greedy request of exactly ``input_tokens`` in, ``output_tokens`` out
        (``batch_size`` identical ones together when that option is above 1)."""
        self._ensure_loaded()
        self.check_request(input_tokens, output_tokens)
        batch = self.generate_batch([ExactRequest(int(input_tokens), int(output_tokens))] * self.batch_size)
        first = batch.requests[0]
        self.last_prompt_ids, self.last_output_ids = self.last_batch_prompt_ids[0], self.last_batch_output_ids[0]
        return GenerationResult(input_tokens=first.input_tokens, output_tokens=first.output_tokens,
                                runtime_s=batch.runtime_s, time_to_first_token_s=batch.time_to_first_token_s,
                                batch_size=self.batch_size)

    def generate_text(self, prompt: str, max_output_tokens: int) -> TextResult:
        """Answer ``prompt`` greedily, stopping at an end-of-generation token or the cap."""
        self._ensure_loaded()
        self._prompt_ids(prompt, max_output_tokens)  # checks the request as before, with its messages
        batch = self.generate_batch([PromptRequest(prompt, int(max_output_tokens))])
        answer = batch.requests[0]
        self.last_output_ids = self.last_batch_output_ids[0]
        return TextResult(text=answer.text or "", input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                          runtime_s=batch.runtime_s, stopped=answer.stopped)

    def generate_batch(self, requests: Sequence[BatchRequest]) -> BatchResult:
        """Run the requests as one batch through ``model.generate``.

        Prompts of different lengths are padded on the left to the longest (attention mask
        0 there; the pad id is the tokenizer's pad token, else its EOS, else 0). Every row
        runs every step until the last request is done: a row that finished earlier keeps
        computing (its tokens are dropped), which :class:`RequestResult` counts as
        ``wasted_decode_tokens``, and the padding as ``padding_tokens``. Exact requests have
        their end-of-generation tokens suppressed; each row stops at its own limit.
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        requests, ids_per_request = self.prepare_batch(requests)
        limits = [output_limit(r) for r in requests]
        longest = max(map(len, ids_per_request))
        self.check_batch_memory(len(requests), longest, max(limits))
        pad_id = self._pad_id()
        fed = [[pad_id] * (longest - len(ids)) + ids for ids in ids_per_request]
        mask = [[0] * (longest - len(ids)) + [1] * len(ids) for ids in ids_per_request]
        clock = _FirstTokenClock()
        processors: list[Any] = [clock]
        exact_rows = [i for i, r in enumerate(requests) if isinstance(r, ExactRequest)]
        device = self._torch_device
        if exact_rows and self.eog_ids:
            processors.append(_SuppressTokens(exact_rows, self.eog_ids, device))
        output, started, finished = self._timed_generate(
            torch.tensor(fed, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device),
            max_new_tokens=max(limits), logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([_RowLimits(longest, limits, device)]),
            return_dict_in_generate=True)
        results, outputs = self._read_back_batch(output, fed, requests, ids_per_request)
        self.last_batch_prompt_ids, self.last_batch_fed_ids, self.last_batch_output_ids = ids_per_request, fed, outputs
        return BatchResult(requests=results, runtime_s=finished - started,
                           time_to_first_token_s=clock.seconds_since(started),
                           decode_steps=int(output.sequences.shape[1]) - longest)

    def _pad_id(self) -> int:
        """The id left padding is filled with (masked out, so any id would do; the tokenizer's own first)."""
        for candidate in (self._tokenizer.pad_token_id, self._tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _timed_generate(self, input_ids: Any, attention_mask: Any, **options: Any) -> tuple[Any, float, float]:
        """Greedy ``model.generate`` with the KV cache on; its output, and when it started and finished.

        On CUDA the device is synchronised on both sides, so the times cover the GPU's work.
        """
        import torch

        on_cuda = self._torch_device.startswith("cuda")
        if on_cuda:
            torch.cuda.synchronize(self._torch_device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self._model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                          num_beams=1, use_cache=True, pad_token_id=self._pad_id(), **options)
        if on_cuda:
            torch.cuda.synchronize(self._torch_device)
        return output, started, time.perf_counter()

    def _read_back_batch(self, output: Any, fed: list[list[int]], requests: tuple[BatchRequest, ...],
                         ids_per_request: list[list[int]]) -> tuple[tuple[RequestResult, ...], list[list[int]]]:
        """Each request's result and answer ids, from what transformers returned.

        Raises:
            TokenCountMismatchError: the batch came back another size, a row does not start
                with its prompt as fed (padding included), the KV cache holds another count
                than the steps run, an exact request got another count or an end-of-generation
                token, or the batch ran more steps than its longest answer needed.
        """
        sequences = output.sequences
        longest = len(fed[0])
        steps = int(sequences.shape[1]) - longest
        if int(sequences.shape[0]) != len(fed) or sequences[:, :longest].tolist() != fed:
            raise TokenCountMismatchError(
                f"{self.path.name}: a generated sequence does not start with its prompt as fed "
                f"(or the batch of {len(fed)} came back with {int(sequences.shape[0])}).")
        # The KV cache holds every position the model ran on: the padded prompts plus each
        # generated token fed back (the last one never is). It is transformers' own count.
        cache = getattr(output, "past_key_values", None)
        if cache is not None and hasattr(cache, "get_seq_length"):
            cached = int(cache.get_seq_length())
            if cached != longest + steps - 1:
                raise TokenCountMismatchError(
                    f"{self.path.name}: the KV cache holds {cached} tokens after a batch of {longest} (padded) "
                    f"prompt tokens and {steps} steps; expected {longest + steps - 1}.")
        eog = set(self.eog_ids)
        results: list[RequestResult] = []
        outputs: list[list[int]] = []
        for number, (request, ids, row) in enumerate(zip(requests, ids_per_request, sequences.tolist(), strict=True),
                                                     start=1):
            generated = row[longest:]
            if isinstance(request, ExactRequest):
                answer = generated[:request.output_tokens]
                if len(answer) != request.output_tokens or len(ids) != request.input_tokens or eog & set(answer):
                    raise TokenCountMismatchError(
                        f"{self.path.name}: request {number}: asked for {request.input_tokens} input and "
                        f"{request.output_tokens} output tokens, transformers processed {len(ids)} and generated "
                        f"{len(answer)}" + (" with an end-of-generation token among them." if eog & set(answer)
                                            else "."))
                stopped, text = STOPPED_CAP, None
            else:
                answer = generated[:request.max_output_tokens]
                end = next((k for k, token in enumerate(answer) if token in eog), None)
                answer = answer if end is None else answer[:end + 1]
                stopped = STOPPED_CAP if end is None else STOPPED_END
                text = self._tokenizer.decode(answer, skip_special_tokens=True)
            outputs.append(answer)
            results.append(RequestResult(input_tokens=len(ids), output_tokens=len(answer), stopped=stopped, text=text,
                                         wasted_decode_tokens=steps - len(answer),
                                         padding_tokens=longest - len(ids)))
        if steps != max(len(answer) for answer in outputs):
            raise TokenCountMismatchError(
                f"{self.path.name}: the batch ran {steps} steps but its longest answer has "
                f"{max(len(answer) for answer in outputs)} tokens.")
        return tuple(results), outputs


class _SuppressTokens:
    """A logits processor that rules out ``token_ids`` in the given rows (exact requests
    must not end early), and leaves the other rows (prompts) free to stop."""

    def __init__(self, rows: list[int], token_ids: list[int], device: str) -> None:
        import torch

        self.rows = torch.tensor(rows, device=device)[:, None]
        self.token_ids = torch.tensor(token_ids, device=device)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[self.rows, self.token_ids] = -float("inf")
        return scores


class _RowLimits:
    """A stopping criterion: row ``i`` is done once it has ``limits[i]`` generated tokens.

    transformers stops a row at an end-of-generation token by itself and the batch when
    every row is done; this adds each row's own length, so that the batch runs no step
    beyond its longest answer.
    """

    def __init__(self, prompt_length: int, limits: list[int], device: str) -> None:
        import torch

        self.prompt_length = prompt_length
        self.limits = torch.tensor(limits, device=device)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return self.limits <= input_ids.shape[1] - self.prompt_length


class _FirstTokenClock:
    """A logits processor that notes when the first logits arrive: prefill is done and
    the first token is picked right after, so this is the time to first token."""

    def __init__(self) -> None:
        self.first_logits_at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first_logits_at is None:
            self.first_logits_at = time.perf_counter()
        return scores

    def seconds_since(self, started: float) -> float | None:
        """Seconds from ``started`` to the first logits, or ``None`` when none arrived."""
        return self.first_logits_at - started if self.first_logits_at is not None else None


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Turn off transformers' tqdm bars for the duration (they would clutter the CLI's
    own progress output and the app's log); restores the previous setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def brief_error(exc: BaseException) -> str:
    """First line of an exception message, for a one-sentence error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
