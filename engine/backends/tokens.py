"""A prompt's tokens, counted exactly as the backend that runs it will count them.

Every backend turns a prompt into the model's BOS token, when the model puts one first,
followed by the prompt's own tokens, with no other special tokens. This module states
that once, in :class:`PromptTokenizer`:

* the backends build each prompt with :meth:`PromptTokenizer.prompt_ids` (and the
  profiling filler with :func:`bos_prefix`);
* planning counts prompts with :meth:`PromptTokenizer.count_prompts`, before any
  weights are loaded, from a tokenizer loaded on its own by :func:`prompt_counter`
  (cached by model path and modification time).

So a planned τin is, by construction, the length of the ids the model is then fed.
Which BOS a model has is library-specific: :func:`hf_bos_id` and :func:`gguf_bos_id`.

The heavy libraries are imported only when a tokenizer of theirs is loaded.
"""

from __future__ import annotations

import abc
import atexit
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelLoadError, PlannerError

#: Counts the tokens each prompt will run with (BOS included); what planning calls.
TokenCounter = Callable[[list[str]], np.ndarray]


# -- the BOS rule -------------------------------------------------------------------------

def bos_prefix(bos_id: int | None) -> list[int]:
    """The ids every prompt starts with: the model's BOS token, or nothing for a model without one."""
    return [bos_id] if bos_id is not None else []


def hf_bos_id(tokenizer: Any) -> int | None:
    """A transformers tokenizer's BOS id, or ``None`` when the model defines none."""
    return tokenizer.bos_token_id


def llama_vocab(llm: Any) -> Any:
    """The llama.cpp vocabulary handle of a ``llama_cpp.Llama`` (full or vocab-only)."""
    return llm._model.vocab  # no public accessor for the vocab handle


def gguf_bos_id(llm: Any) -> int | None:
    """The BOS id a llama.cpp model's prompts start with, or ``None``.

    BOS comes first when the model asks for it (``add_bos``), as llama.cpp itself does,
    or when it defines one that does not also end generation; a model without BOS gets
    its prompt only.
    """
    import llama_cpp

    vocab = llama_vocab(llm)
    bos = llama_cpp.llama_vocab_bos(vocab)
    if bos < 0:
        return None
    adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    return bos if adds_bos or not llama_cpp.llama_vocab_is_eog(vocab, bos) else None


# -- tokenizers as the backends use them ----------------------------------------------------

class PromptTokenizer(abc.ABC):
    """A model's tokenizer, used the one way every backend uses it for prompts.

    Safe to share between threads (planning may count from several at once): calls
    into the library take turns.
    """

    def __init__(self, bos_id: int | None) -> None:
        #: The BOS id prompts start with, or ``None`` (see :func:`bos_prefix`).
        self.bos_id = bos_id
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` alone: no BOS, no other special tokens."""
        with self._lock:
            return list(self._encode(text))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a backend feeds the model for ``prompt``: BOS (when the model has one), then the prompt."""
        return bos_prefix(self.bos_id) + self.encode(prompt)

    def count_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """``len(prompt_ids(p))`` for each prompt (int64), counted in batches without building the ids."""
        prompts = [str(p) for p in prompts]
        with self._lock:
            lengths = self._count(prompts) if prompts else np.zeros(0, dtype=np.int64)
        return lengths + len(bos_prefix(self.bos_id))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """A :data:`TokenCounter`: the same as :meth:`count_prompts`."""
        return self.count_prompts(prompts)

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The library's ids of ``text``, no special tokens (called under the lock)."""

    @abc.abstractmethod
    def _count(self, prompts: list[str]) -> np.ndarray:
        """``len(_encode(p))`` per prompt, as int64 (called under the lock)."""


class HfPromptTokenizer(PromptTokenizer):
    """A transformers tokenizer.

    Counting uses a fast tokenizer's Rust ``encode_batch_fast`` directly when it encodes
    as the tokenizer does (checked on the first prompts counted), skipping transformers'
    per-call work; otherwise the tokenizer itself, in batches.
    """

    _CHUNK = 16_384  # prompts per batch, so a large workload never holds all token ids at once
    _CHECK_SAMPLE = 16  # prompts the fast path is checked on before it is trusted

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(hf_bos_id(tokenizer))
        self.tokenizer = tokenizer
        rust = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        # A truncation or padding stored in tokenizer.json would change the counts.
        self._rust = rust if rust is not None and rust.truncation is None and rust.padding is None else None
        self._fast_checked = False

    @property
    def fast_batch_counting(self) -> bool:
        """Whether counting goes straight to the Rust tokenizer (after it passed its check, or before any)."""
        return self._rust is not None

    def _encode(self, text: str) -> list[int]:
        # verbose=False: a prompt (or the filler) may be longer than model_max_length; that is fine here.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _count_slow(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(prompts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(prompts))

    def _count_fast(self, prompts: list[str]) -> np.ndarray:
        encode = getattr(self._rust, "encode_batch_fast", None) or self._rust.encode_batch  # _fast: tokenizers >= 0.20
        encodings = encode(prompts, add_special_tokens=False)
        return np.fromiter(map(len, encodings), dtype=np.int64, count=len(prompts))

    def _count(self, prompts: list[str]) -> np.ndarray:
        if self._rust is not None and not self._fast_checked:
            sample = prompts[:self._CHECK_SAMPLE]
            if not np.array_equal(self._count_fast(sample), self._count_slow(sample)):
                self._rust = None
            self._fast_checked = True
        count = self._count_fast if self._rust is not None else self._count_slow
        return np.concatenate([count(prompts[i:i + self._CHUNK]) for i in range(0, len(prompts), self._CHUNK)])


class GgufPromptTokenizer(PromptTokenizer):
    """The vocabulary of a ``llama_cpp.Llama``: a loaded model's, or a vocab-only one (no weights)."""

    def __init__(self, llm: Any) -> None:
        super().__init__(gguf_bos_id(llm))
        self.llm = llm  # owns the vocabulary; kept alive as long as this tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _count(self, prompts: list[str]) -> np.ndarray:
        import llama_cpp

        tokenize, vocab = llama_cpp.llama_tokenize, llama_vocab(self.llm)
        # The same call Llama.tokenize makes (add_special=False, parse_special=False), but with
        # no output buffer llama.cpp only counts: it returns minus the number of tokens
        # (Llama.tokenize would tokenise each prompt twice and build a list).
        return np.fromiter((-tokenize(vocab, text, len(text), None, 0, False, False)
                            for text in (p.encode("utf-8") for p in prompts)),
                           dtype=np.int64, count=len(prompts))


# -- loading tokenizers on their own --------------------------------------------------------

def open_hf_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer from a local model directory, never from a hub.

    Raises whatever transformers raises; callers turn it into their sentence.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file must fail, not start a download
    from transformers import AutoTokenizer

    from engine.backends.hf import quiet_progress_bars  # hf imports this module: import at call time

    with quiet_progress_bars():
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


# Loaded tokenizers by (backend, path, mtime, trust_remote_code): counting the same model's
# prompts again, for the same or another workload, does not load the tokenizer again.
_CACHE: dict[tuple, PromptTokenizer] = {}
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()
# Free them while llama_cpp is still whole: a vocab-only Llama left to interpreter
# teardown fails in its __del__ and prints a traceback on exit.
atexit.register(_CACHE.clear)


def prompt_counter(backend: str, path: str | Path, *, model_name: str,
                   trust_remote_code: bool = False) -> PromptTokenizer:
    """The tokenizer the ``backend`` running ``path`` counts prompts with, loaded without weights.

    Cached by backend, path, newest modification time and ``trust_remote_code``: a model
    replaced on disk is loaded afresh. ``model_name`` names the model in errors.

    Raises:
        ModelLoadError: the path does not exist or is the wrong kind, the tokenizer
            could not be loaded, or ``backend`` is not one that runs local files.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{model_name}: {path} does not exist, so its tokenizer cannot count the prompts; "
                             "restore the model files, fix its path in the catalog, "
                             "or give input_tokens in the workload.")
    key = (backend, str(path.resolve()), _mtime_ns(path), bool(trust_remote_code))
    with _CACHE_LOCK:
        tokenizer = _CACHE.get(key)
    if tokenizer is not None:
        return tokenizer
    if backend == "transformers":
        tokenizer = _load_hf(model_name, path, bool(trust_remote_code))
    elif backend == "llama.cpp":
        tokenizer = _load_gguf(model_name, path)
    else:
        raise ModelLoadError(f"{model_name}: unknown backend {backend!r}; fix the model in the catalog.")
    with _CACHE_LOCK:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = tokenizer
    return tokenizer


def _mtime_ns(path: Path) -> int:
    """Newest modification time of a model file, or of a model directory and its files."""
    if not path.is_dir():
        return path.stat().st_mtime_ns
    return max([path.stat().st_mtime_ns, *(f.stat().st_mtime_ns for f in path.iterdir() if f.is_file())])


def _load_hf(model_name: str, path: Path, trust_remote_code: bool) -> HfPromptTokenizer:
    from engine.backends.hf import brief_error

    if not path.is_dir():
        raise ModelLoadError(f"{model_name}: {path} is not a directory, so it has no transformers tokenizer; "
                             "fix the model's path in the catalog.")
    try:
        tokenizer = open_hf_tokenizer(path, trust_remote_code)
    except Exception as exc:  # transformers raises many kinds; all mean "cannot load"
        raise ModelLoadError(
            f"The tokenizer of {model_name} could not be loaded from {path} ({brief_error(exc)}); make sure the "
            "directory has its tokenizer files (tokenizer.json or tokenizer.model), or give input_tokens in the "
            "workload.") from exc
    return HfPromptTokenizer(tokenizer)


def _load_gguf(model_name: str, path: Path) -> GgufPromptTokenizer:
    from engine.backends.gguf_check import inspect_gguf
    from engine.backends.hf import brief_error

    try:
        inspect_gguf(path)  # llama.cpp can abort the process on a corrupt file; refuse it first
    except PlannerError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ModelLoadError(f"The tokenizer of {model_name} could not be read from {path}: {reason}") from None
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError
        raise ModelLoadError(
            f"The tokenizer of {model_name} could not be loaded by llama.cpp from {path} ({brief_error(exc)}); "
            "check the file, or give input_tokens in the workload.") from exc
    return GgufPromptTokenizer(llm)
