"""llama-cpp-python backend: a ``.gguf`` file on ``cpu``, or offloaded to a GPU.

The file is validated with :func:`~engine.backends.gguf_check.inspect_gguf` first:
llama.cpp can abort the process on a corrupt file, and a clear sentence is better
than a dead worker.
"""

from __future__ import annotations

import os
import time
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
)
from engine.backends.gguf_check import GgufInfo, inspect_gguf
from engine.backends.tokens import GgufPromptTokenizer, llama_vocab
from engine.errors import DeviceUnavailableError, InputError, ModelLoadError, Problem, TokenCountMismatchError

DEFAULT_MAX_CONTEXT = 4096  # a larger KV cache costs memory the demo design never uses
DEFAULT_SEED = 1234  # greedy decoding ignores it; fixed anyway so no run draws entropy


class LlamaCppBackend(Backend):
    """A GGUF model run by llama-cpp-python.

    Options:
        n_ctx: context (KV cache) size in tokens; default the smaller of the model's
            trained context and 4096.
        n_threads: CPU threads for prefill and decode; default the physical cores.
        n_batch: prompt tokens per decode call; default 512 (llama-cpp-python's).
        seed: sampler seed; default 1234.
    """

    name = "llama.cpp"

    def __init__(self, path: str | Path, device: str = "cpu", **options: Any) -> None:
        super().__init__(path, device, **options)
        if self.batch_size != 1:
            # llama-cpp-python's Llama object decodes one sequence at a time.
            raise InputError(Problem("batch_size", f"{self.batch_size} is not supported by the llama.cpp backend",
                                     None, "batch size 1 for .gguf models (the transformers backend batches)"))
        self._llm: Any = None
        self.info: GgufInfo | None = None
        self._filler_ids: list[int] = []
        self._eog_ids: list[int] = []
        self._n_ctx = 0

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
            "n_batch": int(self.options.get("n_batch") or 512),
            "seed": int(self.options.get("seed", DEFAULT_SEED)),
            "verbose": False,
            **gpu,
        }
        # Physical cores, as torch uses by default, so both backends use the host alike
        # (llama-cpp-python's own default, half the logical CPUs, is 1 thread on 2 cores).
        n_threads = int(self.options.get("n_threads") or _physical_cores())
        kwargs["n_threads"] = n_threads
        kwargs["n_threads_batch"] = n_threads
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
        """Free the llama.cpp model and context."""
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
            "n_batch": self._llm.n_batch,
            "file_type": self.info.file_type_name if self.info else None,
            "llama_cpp_python_version": llama_cpp.__version__,
        }

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


def _physical_cores() -> int:
    """Physical CPU cores this process may use (at least 1)."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False) or allowed or 1
    return max(1, min(physical, allowed or physical))
