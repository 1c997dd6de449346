"""Will a batch fit? Its memory need, estimated before it runs, against the device's free memory.

A batch of B requests of τin prompt and τout generated tokens needs, besides the weights:

* the **KV cache**: per token and layer one key and one value vector per key/value head,
  ``2 × layers × kv_heads × head_dim × bytes per element``, for B × (τin + τout) tokens
  (the cache is rectangular: transformers pads every row to the longest prompt and runs
  the most steps any row needs; llama.cpp gives each sequence the same share);
* **activations**: the working set of the largest forward pass, the prefill of
  B × τin tokens (llama.cpp splits it into passes of at most ``n_batch`` tokens), about
  ``4 × hidden + 3 × feed-forward`` values per token (residual, normed input, query/key/
  value and attention output; gate, up and their product), plus one row of float32
  logits per request;
* a margin of :data:`HEADROOM_FRACTION` on the two, for allocator rounding and the
  buffers the estimate leaves out.

Attention scores are not counted: both backends use fused attention that never holds
the whole τin × τin matrix (transformers' SDPA, llama.cpp's own kernels). The weights
count only when they are not loaded yet (a loaded model's memory is already taken,
so the free memory reported excludes it).

:func:`estimate_batch_memory` and :func:`check_batch_fits` are pure; :func:`free_memory_bytes`
reads the device (available RAM on the CPU; on a GPU torch's view when torch already
uses CUDA, else NVML).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.backends.base import parse_device
from engine.errors import InputError, Problem

#: Margin on KV cache and activations, for allocator rounding and the buffers not modelled.
HEADROOM_FRACTION = 0.10

#: Bytes of one element of each dtype the backends use.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


@dataclass(frozen=True)
class ModelMemory:
    """The sizes a model's memory need per batch is made of.

    Attributes:
        weights_bytes: the weights as they sit in device memory.
        kv_bytes_per_token: KV cache of one token, all layers:
            ``2 × layers × kv_heads × head_dim × bytes per element``.
        activation_bytes_per_token: working set of one token in a forward pass.
        logits_bytes_per_request: one row of float32 logits (``vocab × 4``).
    """

    weights_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    logits_bytes_per_request: int


@dataclass(frozen=True)
class BatchMemoryEstimate:
    """What a batch of ``batch_size`` × (``input_tokens`` + ``output_tokens``) needs, in bytes.

    ``weights_bytes`` is 0 when the weights are loaded already (see ``weights_loaded_bytes``).
    """

    batch_size: int
    input_tokens: int
    output_tokens: int
    kv_cache_bytes: int
    activation_bytes: int
    weights_bytes: int
    weights_loaded_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Everything still to be allocated: weights (if not loaded) plus KV cache and activations with the margin."""
        return self.weights_bytes + round((self.kv_cache_bytes + self.activation_bytes) * (1 + HEADROOM_FRACTION))

    def describe(self) -> str:
        """``batch of 64 × (2048 + 512) tokens needs ≈ 21.4 GB of KV cache plus ...``, for messages."""
        parts = f"≈ {format_bytes(self.kv_cache_bytes)} of KV cache plus {format_bytes(self.activation_bytes)} " \
                "of activations"
        if self.weights_bytes:
            parts += f" and {format_bytes(self.weights_bytes)} of weights"
        text = (f"batch of {self.batch_size} × ({self.input_tokens} + {self.output_tokens}) tokens needs {parts} "
                f"(≈ {format_bytes(self.total_bytes)} with a {HEADROOM_FRACTION:.0%} margin")
        if self.weights_loaded_bytes:
            text += f"; the {format_bytes(self.weights_loaded_bytes)} of weights are loaded already"
        return text + ")"


def format_bytes(n_bytes: float) -> str:
    """``21.4 GB``, ``350 MB``, ``12 kB``: decimal units, as device memory is quoted."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


def estimate_batch_memory(model: ModelMemory, batch_size: int, input_tokens: int, output_tokens: int, *,
                          weights_loaded: bool = False, max_tokens_per_pass: int | None = None,
                          kv_tokens_per_request: int | None = None) -> BatchMemoryEstimate:
    """The memory a batch needs (see the module docstring for the terms).

    Args:
        model: the model's sizes.
        batch_size: requests in the batch.
        input_tokens, output_tokens: the longest prompt and the most generated tokens of
            any request (the cache is as long as the longest row).
        weights_loaded: the weights are in memory already; they are not counted again.
        max_tokens_per_pass: the most tokens one forward pass holds (llama.cpp's
            ``n_batch``); ``None``: the whole prefill in one pass (transformers).
        kv_tokens_per_request: cache cells each request is given, when the backend rounds
            them up (llama.cpp: to a multiple of 256); default ``input_tokens + output_tokens``.
    """
    kv_tokens = kv_tokens_per_request if kv_tokens_per_request is not None else input_tokens + output_tokens
    prefill_tokens = batch_size * input_tokens
    if max_tokens_per_pass is not None:
        prefill_tokens = min(prefill_tokens, max_tokens_per_pass)
    return BatchMemoryEstimate(
        batch_size=batch_size, input_tokens=input_tokens, output_tokens=output_tokens,
        kv_cache_bytes=model.kv_bytes_per_token * batch_size * kv_tokens,
        activation_bytes=(model.activation_bytes_per_token * prefill_tokens
                          + model.logits_bytes_per_request * batch_size),
        weights_bytes=0 if weights_loaded else model.weights_bytes,
        weights_loaded_bytes=model.weights_bytes if weights_loaded else 0,
    )


def check_batch_fits(estimate: BatchMemoryEstimate, free_bytes: int | None, device: str,
                     largest_batch_that_fits: int | None = None) -> None:
    """Refuse a batch whose estimate exceeds the device's free memory.

    ``free_bytes`` ``None`` (the device cannot say) lets the batch run: the estimate only
    refuses what is known not to fit. ``largest_batch_that_fits``, when given, is named
    in the message as what would fit.

    Raises:
        InputError: ``batch of 64 × (2048 + 512) tokens needs ≈ 21.4 GB of KV cache plus
            ... ; cuda:0 has 24.0 GB free``.
    """
    if free_bytes is None or estimate.total_bytes <= free_bytes:
        return
    if largest_batch_that_fits:
        expected = (f"at most {largest_batch_that_fits} requests of this shape in one batch on {device}, "
                    "or a device with more free memory")
    else:
        expected = f"shorter requests, or a device with more free memory than {device}"
    raise InputError(Problem("batch_size", f"{estimate.describe()}; {device} has {format_bytes(free_bytes)} free",
                             None, expected))


def largest_fitting_batch(model: ModelMemory, input_tokens: int, output_tokens: int, free_bytes: int,
                          upper: int, **options: Any) -> int:
    """The largest batch size from 0 to ``upper`` whose estimate fits in ``free_bytes``.

    ``options`` are those of :func:`estimate_batch_memory`. The need grows with the batch
    size, so a bisection finds it.
    """
    def fits(batch_size: int) -> bool:
        return estimate_batch_memory(model, batch_size, input_tokens, output_tokens, **options).total_bytes \
            <= free_bytes

    if upper < 1 or not fits(1):
        return 0
    low, high = 1, upper  # fits(low) holds; the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


# -- the sizes of a model ------------------------------------------------------------------

def transformer_memory(*, layers: int, kv_heads: int, head_dim: int, hidden_size: int, feed_forward: int,
                       vocab_size: int, weights_bytes: int, kv_element_bytes: int,
                       activation_element_bytes: int) -> ModelMemory:
    """A decoder-only transformer's :class:`ModelMemory` from its shape."""
    return ModelMemory(
        weights_bytes=int(weights_bytes),
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * kv_element_bytes,
        activation_bytes_per_token=(4 * hidden_size + 3 * feed_forward) * activation_element_bytes,
        logits_bytes_per_request=vocab_size * 4,
    )


def hf_model_memory(config: Mapping[str, Any], weights_bytes: int, element_bytes: int) -> ModelMemory | None:
    """From a transformers ``config.json`` (as a dict); ``None`` when it lacks the sizes needed.

    The KV cache and activations are held in the model's dtype (``element_bytes``).
    """
    config = config.get("text_config") or config  # a multimodal model's language part
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return transformer_memory(
            layers=int(config["num_hidden_layers"]),
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            hidden_size=hidden,
            feed_forward=int(config.get("intermediate_size") or 4 * hidden),
            vocab_size=int(config["vocab_size"]),
            weights_bytes=weights_bytes,
            kv_element_bytes=element_bytes,
            activation_element_bytes=element_bytes,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def gguf_model_memory(info: Any, kv_element_bytes: int = 2) -> ModelMemory | None:
    """From a :class:`~engine.backends.gguf_check.GgufInfo`; ``None`` when its header lacks the sizes.

    llama.cpp keeps the KV cache in float16 by default (``kv_element_bytes`` 2) and computes
    activations in float32; the weights are the file's tensor data.
    """
    sizes = (info.block_count, info.head_count_kv, info.key_length, info.value_length, info.embedding_length,
             info.vocab_size)
    if any(not size for size in sizes):
        return None
    head_dim_sum = info.key_length + info.value_length  # keys and values may differ in width
    return ModelMemory(
        weights_bytes=int(info.tensor_data_bytes),
        kv_bytes_per_token=info.block_count * info.head_count_kv * head_dim_sum * kv_element_bytes,
        activation_bytes_per_token=(4 * info.embedding_length + 3 * (info.feed_forward_length or
                                                                      4 * info.embedding_length)) * 4,
        logits_bytes_per_request=info.vocab_size * 4,
    )


# -- free memory of a device ------------------------------------------------------------------

def free_memory_bytes(device: str, *, available_ram: Callable[[], int] | None = None,
                      cuda_free: Callable[[int], int | None] | None = None) -> int | None:
    """Bytes a new allocation can still get on ``device``, or ``None`` when it cannot be read.

    ``cpu``: the RAM available without swapping (``psutil.virtual_memory().available``).
    ``cuda:N``: :func:`cuda_free_bytes`. The readers can be replaced (tests pass fakes).
    """
    spec = parse_device(device)
    if spec.kind == "cpu":
        if available_ram is None:
            import psutil

            return int(psutil.virtual_memory().available)
        return available_ram()
    return (cuda_free or cuda_free_bytes)(spec.index or 0)


def cuda_free_bytes(cuda_index: int, nvml: Any = None) -> int | None:
    """Free memory of ``cuda:<cuda_index>``, or ``None`` when neither torch nor NVML can say.

    When this process's torch already uses CUDA, its view is taken (``mem_get_info``, plus
    what torch's caching allocator holds but does not use: that is free for this process).
    Otherwise NVML, so that asking never initialises CUDA in this process.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        free, _total = torch.cuda.mem_get_info(cuda_index)
        cached = torch.cuda.memory_reserved(cuda_index) - torch.cuda.memory_allocated(cuda_index)
        return int(free + cached)
    from engine.energy.errors import SensorUnavailableError
    from engine.energy.nvml import import_pynvml, resolve_cuda_device

    nvml = nvml if nvml is not None else import_pynvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    try:
        _identity, handle = resolve_cuda_device(cuda_index, nvml)
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).free)
    except (nvml.NVMLError, SensorUnavailableError):
        return None
    finally:
        nvml.nvmlShutdown()
