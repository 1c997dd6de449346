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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.backends.base import (  # noqa: I001
    TextResult,
    FILLER_TEXT,
    Backend,
    GenerationResult,
    parse_device,
    prompt_ids,
)
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
    """

    name = "transformers"

    def __init__(self, path: str | Path, device: str = "cpu", **options: Any) -> None:
        super().__init__(path, device, **options)
        self._model: Any = None
        self._tokenizer: Any = None
        self._torch_device: str = "cpu"
        self._filler_ids: list[int] = []
        self._context_length = 0

    # -- lifecycle -----------------------------------------------------------------
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

    # -- requests ------------------------------------------------------------------
    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        """Run one greedy request of exactly ``input_tokens`` in, ``output_tokens`` out."""
        import torch
        from transformers import LogitsProcessorList

        self._ensure_loaded()
        self.check_request(input_tokens, output_tokens)
        input_tokens, output_tokens = int(input_tokens), int(output_tokens)
        ids = prompt_ids(self._filler_ids, self.prompt_tokenizer.bos_id, input_tokens)
        self.last_prompt_ids = ids
        input_ids = torch.tensor([ids] * self.batch_size, dtype=torch.long, device=self._torch_device)
        clock = _FirstTokenClock()
        # min_new_tokens == max_new_tokens: transformers masks every EOS id of the
        # generation config to -inf until the last step, so the answer cannot end early.
        output, started, finished = self._timed_generate(
            input_ids, max_new_tokens=output_tokens, min_new_tokens=output_tokens,
            logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
        got_in, got_out = self._read_back_counts(output, ids, input_tokens, output_tokens)
        self.last_output_ids = output.sequences[0][got_in:].tolist()
        return GenerationResult(
            input_tokens=got_in,
            output_tokens=got_out,
            runtime_s=finished - started,
            time_to_first_token_s=clock.seconds_since(started),
            batch_size=self.batch_size,
        )

    def _timed_generate(self, input_ids: Any, **options: Any) -> tuple[Any, float, float]:
        """Greedy ``model.generate`` with the KV cache on; its output, and when it started and finished.

        On CUDA the device is synchronised on both sides, so the times cover the GPU's work.
        """
        import torch

        pad_id = self._tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self._tokenizer.eos_token_id
        on_cuda = self._torch_device.startswith("cuda")
        if on_cuda:
            torch.cuda.synchronize(self._torch_device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self._model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id,
                                          **options)
        if on_cuda:
            torch.cuda.synchronize(self._torch_device)
        return output, started, time.perf_counter()

    def _read_back_counts(self, output: Any, ids: list[int], input_tokens: int,
                          output_tokens: int) -> tuple[int, int]:
        """Prompt and generated tokens per request, as transformers processed them.

        Raises:
            TokenCountMismatchError: a sequence does not start with the prompt, the batch
                came back another size, the KV cache holds another count, or the counts
                differ from the request.
        """
        sequences = output.sequences
        got_in = len(ids)
        got_out = int(sequences[0].shape[0]) - got_in
        if int(sequences.shape[0]) != self.batch_size or any(row[:got_in].tolist() != ids for row in sequences):
            raise TokenCountMismatchError(
                f"{self.path.name}: a generated sequence does not start with the prompt "
                f"(or the batch of {self.batch_size} came back with {int(sequences.shape[0])})."
            )
        # The KV cache holds every token the model ran on: the prompt plus each generated
        # token fed back (the last one never is). It is transformers' own count.
        cache = getattr(output, "past_key_values", None)
        if cache is not None and hasattr(cache, "get_seq_length"):
            cached = int(cache.get_seq_length())
            if cached != got_in + got_out - 1:
                raise TokenCountMismatchError(
                    f"{self.path.name}: the KV cache holds {cached} tokens after a request of "
                    f"{got_in} in and {got_out} out; expected {got_in + got_out - 1}."
                )
        if got_in != input_tokens or got_out != output_tokens:
            raise TokenCountMismatchError(
                f"{self.path.name}: asked for {input_tokens} input and {output_tokens} output "
                f"tokens, transformers processed {got_in} and generated {got_out}."
            )
        return got_in, got_out

    def generate_text(self, prompt: str, max_output_tokens: int) -> TextResult:
        """Answer ``prompt`` greedily, stopping at an end-of-generation token or the cap."""
        import torch

        self._ensure_loaded()
        ids = self._prompt_ids(prompt, max_output_tokens)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._torch_device)
        output, started, finished = self._timed_generate(input_ids, max_new_tokens=int(max_output_tokens))
        generated = output[0][len(ids):].tolist()
        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        stopped = "end of answer" if generated and generated[-1] in eos_ids else "output cap"
        self.last_output_ids = generated
        return TextResult(text=self._tokenizer.decode(generated, skip_special_tokens=True), input_tokens=len(ids),
                          output_tokens=len(generated), runtime_s=finished - started, stopped=stopped)


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
