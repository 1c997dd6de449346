"""Backends run batches: padding, exact counts per request, waste counted, EOS rows, greedy
equivalence with single requests, memory refusal and bad batch sizes."""

from __future__ import annotations

import pytest

from engine.backends import open_backend, tokens
from engine.backends.base import prompt_ids
from engine.backends.batch import (
    MAX_BATCH_SIZE,
    STOPPED_CAP,
    STOPPED_END,
    ExactRequest,
    PromptRequest,
    check_batch,
    check_batch_size,
)
from engine.backends.memory import (
    BatchMemoryEstimate,
    check_batch_fits,
    cuda_free_bytes,
    estimate_batch_memory,
    free_memory_bytes,
    gguf_model_memory,
    hf_model_memory,
    largest_fitting_batch,
    transformer_memory,
)
from engine.errors import InferenceError, InputError, TokenCountMismatchError
from tests.test_backends import EOS_ID, eos_models  # noqa: F401 (eos_models is a fixture used here)

PROMPTS = ["Summarise the water cycle for a ten-year-old.", "Hi",
           "What does a planner do with energy, watts and joules?"]


@pytest.fixture(scope="module")
def small(demo_models):
    with open_backend("transformers", demo_models["transformers"].path) as backend:
        backend.generate(8, 4)  # warm-up
        yield backend


@pytest.fixture(scope="module")
def large(demo_models):
    with open_backend("llama.cpp", demo_models["llama.cpp"].path) as backend:
        yield backend


@pytest.fixture(params=["small", "large"])
def backend(request):
    return request.getfixturevalue(request.param)


# -- padding and the tokens each row was fed ---------------------------------------------

def test_transformers_pads_on_the_left_and_feeds_each_row_its_own_prompt(small):
    requests = [ExactRequest(3, 4), ExactRequest(17, 4), ExactRequest(40, 4)]
    result = small.generate_batch(requests)
    pad = small._tokenizer.pad_token_id
    bos = small.prompt_tokenizer.bos_id
    for request, row, own, fed in zip(requests, result.requests, small.last_batch_prompt_ids,
                                      small.last_batch_fed_ids, strict=True):
        assert own == prompt_ids(small._filler_ids, bos, request.input_tokens)
        assert len(fed) == 40 and fed == [pad] * (40 - request.input_tokens) + own
        assert row.input_tokens == request.input_tokens and row.padding_tokens == 40 - request.input_tokens
    assert result.padding_tokens == 37 + 23


def test_planned_input_tokens_are_what_each_row_of_a_batch_was_fed(backend, demo_models):
    demo = demo_models[backend.name]
    planned = tokens.prompt_counter(demo.backend, demo.path, model_name=demo.name).count_prompts(PROMPTS).tolist()
    result = backend.generate_batch([PromptRequest(p, 2) for p in PROMPTS])
    assert [r.input_tokens for r in result.requests] == planned
    assert [len(ids) for ids in backend.last_batch_prompt_ids] == planned
    for prompt, own, fed, count in zip(PROMPTS, backend.last_batch_prompt_ids, backend.last_batch_fed_ids, planned,
                                       strict=True):
        assert own == backend.prompt_tokenizer.prompt_ids(prompt)
        assert fed[len(fed) - count:] == own  # the row ends with its own prompt; anything before it is padding


# -- exact counts, waste -------------------------------------------------------------------

def test_transformers_counts_the_steps_a_finished_request_keeps_computing(small):
    result = small.generate_batch([ExactRequest(16, 8), ExactRequest(16, 32)])
    assert [(r.input_tokens, r.output_tokens) for r in result.requests] == [(16, 8), (16, 32)]
    assert [len(ids) for ids in small.last_batch_output_ids] == [8, 32]
    assert result.decode_steps == 32 and result.batch_size == 2
    assert [r.wasted_decode_tokens for r in result.requests] == [24, 0]
    assert (result.wasted_decode_tokens, result.padding_tokens, result.waste_tokens) == (24, 0, 24)
    assert all(r.stopped == STOPPED_CAP and r.text is None for r in result.requests)
    assert 0 < result.time_to_first_token_s < result.runtime_s


def test_llamacpp_drops_finished_requests_so_nothing_is_wasted(large):
    result = large.generate_batch([ExactRequest(16, 8), ExactRequest(5, 20), ExactRequest(30, 1)])
    assert [(r.input_tokens, r.output_tokens) for r in result.requests] == [(16, 8), (5, 20), (30, 1)]
    assert [len(ids) for ids in large.last_batch_output_ids] == [8, 20, 1]
    assert result.decode_steps == 20
    assert result.waste_tokens == 0 and result.input_tokens == 51 and result.output_tokens == 29
    assert 0 < result.time_to_first_token_s < result.runtime_s


def test_identical_requests_as_a_batch(backend):
    result = backend.generate_batch([ExactRequest(12, 6)] * 4)
    assert result.batch_size == 4 and result.waste_tokens == 0
    assert all((r.input_tokens, r.output_tokens) == (12, 6) for r in result.requests)
    assert len({tuple(ids) for ids in backend.last_batch_output_ids}) == 1  # same prompt, same greedy answer


# -- greedy equivalence with single requests -----------------------------------------------

@pytest.mark.parametrize("kind", ["small", "large"])
def test_a_batch_answers_each_request_as_it_would_be_answered_alone(request, kind):
    backend = request.getfixturevalue(kind)
    exact = [(9, 12), (33, 5), (2, 16)]
    batch = backend.generate_batch([ExactRequest(i, o) for i, o in exact] + [PromptRequest(PROMPTS[0], 6)])
    batched = backend.last_batch_output_ids
    alone = []
    for i, o in exact:
        backend.generate(i, o)  # the single-request path of each backend (llama.cpp: llama_cpp.Llama)
        alone.append(backend.last_output_ids)
    text = backend.generate_text(PROMPTS[0], 6)
    alone.append(backend.last_output_ids)
    assert batched == alone
    assert batch.requests[-1].text == text.text and batch.requests[-1].stopped == text.stopped


# -- rows that stop at an end-of-generation token -------------------------------------------

@pytest.mark.parametrize("kind", ["transformers", "llama.cpp"])
def test_prompt_rows_stop_at_eos_and_exact_rows_do_not(eos_models, kind):  # noqa: F811 (the fixture)
    with open_backend(kind, eos_models[kind]) as backend:
        result = backend.generate_batch([PromptRequest("hello there", 8), ExactRequest(10, 6)])
        answers = backend.last_batch_output_ids
    stop, exact = result.requests
    assert (stop.output_tokens, stop.stopped, stop.text) == (1, STOPPED_END, "") and answers[0] == [EOS_ID]
    assert (exact.output_tokens, exact.stopped) == (6, STOPPED_CAP) and EOS_ID not in answers[1]
    assert result.decode_steps == 6
    # transformers keeps the finished row in the batch for the 5 remaining steps; llama.cpp drops it
    assert stop.wasted_decode_tokens == (5 if kind == "transformers" else 0)


# -- the read-back catches what the library did not do ----------------------------------------

def test_transformers_batch_detects_a_short_row(small, monkeypatch):
    real_generate = small._model.generate

    def stops_early(**kwargs):
        kwargs["max_new_tokens"] -= 1
        return real_generate(**kwargs)

    monkeypatch.setattr(small._model, "generate", stops_early)
    with pytest.raises(TokenCountMismatchError, match="request 2: asked for 7 input and 9 output tokens.*generated 8"):
        small.generate_batch([ExactRequest(5, 3), ExactRequest(7, 9)])


def test_llamacpp_batch_refuses_a_cache_left_from_the_previous_batch(eos_models, monkeypatch):  # noqa: F811
    import llama_cpp

    with open_backend("llama.cpp", eos_models["llama.cpp"]) as backend:
        backend.generate_batch([ExactRequest(6, 3), ExactRequest(4, 2)])
        monkeypatch.setattr(llama_cpp, "llama_memory_clear", lambda memory, data: None)
        with pytest.raises(InferenceError, match="llama.cpp could not decode a batch"):
            backend.generate_batch([ExactRequest(6, 3), ExactRequest(4, 2)])


# -- bad batches ----------------------------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    (0, "0 is not allowed: a batch holds at least one request"),
    (-3, "-3 is not allowed: a batch holds at least one request"),
    (2.5, "2.5 is not a whole number of requests"),
    (True, "True is not a whole number of requests"),
    ("8", "'8' is not a whole number of requests"),
    (MAX_BATCH_SIZE + 1, f"{MAX_BATCH_SIZE + 1} is more than the {MAX_BATCH_SIZE} requests one batch may hold"),
])
def test_bad_batch_sizes_are_refused(value, message):
    with pytest.raises(InputError, match=message) as err:
        check_batch_size(value)
    assert err.value.problems[0].expected == f"a whole number of requests from 1 to {MAX_BATCH_SIZE}"


def test_batch_size_one_to_the_max_is_accepted():
    import numpy as np

    assert check_batch_size(np.int64(16)) == 16 and check_batch_size(MAX_BATCH_SIZE) == MAX_BATCH_SIZE


@pytest.mark.parametrize("value", [0, -1, 2.5, MAX_BATCH_SIZE + 1])
def test_the_batch_size_option_is_checked(demo_models, value):
    with pytest.raises(InputError, match="batch_size"):
        open_backend("transformers", demo_models["transformers"].path, batch_size=value)


def test_an_empty_or_oversized_batch_is_refused(backend):
    with pytest.raises(InputError, match="batch: is empty; expected 1 to"):
        backend.generate_batch([])
    too_many = backend.max_batch_size + 1
    with pytest.raises(InputError, match=f"batch: {too_many} is more than the {backend.max_batch_size} requests"):
        backend.generate_batch([ExactRequest(1, 1)] * too_many)


def test_llamacpp_batch_size_is_bounded_by_n_batch(demo_models):
    backend = open_backend("llama.cpp", demo_models["llama.cpp"].path, n_batch=8)
    assert backend.max_batch_size == 8
    with pytest.raises(InputError, match="9 is more than the 8 requests"):
        backend.generate_batch([ExactRequest(1, 1)] * 9)  # refused before anything is loaded
    assert not backend._loaded


def test_every_bad_request_is_named(small):
    with pytest.raises(InputError) as err:
        small.generate_batch([ExactRequest(4, 4), ExactRequest(0, 4), PromptRequest("hi", 2.5), "8,8",
                              ExactRequest(4000, 200)])
    text = str(err.value)
    assert "request 2: column input_tokens: 0 is not allowed; expected a whole number of tokens >= 1" in text
    assert "request 3: column max_output_tokens: 2.5 is not allowed" in text
    assert "request 4: str is not a request" in text
    # the context is checked once the fields are whole numbers
    with pytest.raises(InputError, match="request 2: input_tokens \\+ output_tokens: 4000 \\+ 200 = 4200 tokens "
                                         "exceeds the context length of 4096"):
        small.generate_batch([ExactRequest(4, 4), ExactRequest(4000, 200)])


def test_check_batch_returns_plain_ints():
    import numpy as np

    (request,) = check_batch([ExactRequest(np.int32(5), np.int64(7))])
    assert request == ExactRequest(5, 7) and type(request.input_tokens) is int
    with pytest.raises(InputError, match="batch: str is not a sequence of requests"):
        check_batch("ExactRequest(1, 1)")


# -- memory: the estimate, its terms checked against the libraries ---------------------------

LLAMA2_7B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 4096,
             "intermediate_size": 11008, "vocab_size": 32000}


def test_kv_cache_per_token_of_a_known_model():
    model = hf_model_memory(LLAMA2_7B, weights_bytes=13_476_839_424, element_bytes=2)
    assert model.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524_288  # 0.5 MiB per token, as widely quoted
    gqa = hf_model_memory({**LLAMA2_7B, "num_key_value_heads": 8}, 0, 2)
    assert gqa.kv_bytes_per_token == model.kv_bytes_per_token // 4
    assert hf_model_memory({"hidden_size": 8}, 0, 2) is None  # sizes unknown: no check rather than a guess


def test_kv_estimate_matches_what_transformers_allocates(small):
    import torch

    model = small.model_memory()
    with torch.inference_mode():
        cache = small._model(torch.zeros((3, 10), dtype=torch.long), use_cache=True).past_key_values
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert allocated == model.kv_bytes_per_token * 3 * 10
    parameters = sum(p.numel() for p in small._model.parameters())
    buffers = sum(b.numel() for b in small._model.buffers())  # the rotary frequencies
    assert model.weights_bytes == 4 * (parameters + buffers) and buffers < parameters / 1000


def test_kv_estimate_matches_what_llamacpp_holds(large):
    import llama_cpp

    large.generate_batch([ExactRequest(40, 10), ExactRequest(20, 5)])
    per_token = large.model_memory().kv_bytes_per_token
    assert per_token == 2 * 12 * 12 * 64 * 2  # demo-large: 12 layers, 12 KV heads of 64, float16
    for sequence, cells in enumerate((40 + 10 - 1, 20 + 5 - 1)):
        held = llama_cpp.llama_state_seq_get_size(large._batch_context.ctx, sequence)
        assert held == pytest.approx(per_token * cells, rel=0.01)  # the state adds a small header


def test_model_memory_is_known_before_loading(demo_models):
    unloaded = open_backend("llama.cpp", demo_models["llama.cpp"].path)
    model = unloaded.model_memory()
    assert model is not None and model.weights_bytes > 100e6 and not unloaded._loaded
    assert unloaded.estimate_batch_memory(2, 8, 8).weights_bytes == model.weights_bytes  # counted: not loaded yet
    hf = open_backend("transformers", demo_models["transformers"].path)
    assert hf.model_memory().kv_bytes_per_token == 2 * 4 * 4 * 32 * 4  # demo-small, float32


def test_gguf_sizes_missing_mean_no_estimate():
    class Header:
        block_count, head_count_kv, key_length, value_length, embedding_length = 12, None, 64, 64, 768
        vocab_size, feed_forward_length, tensor_data_bytes = 2048, 2048, 1000

    assert gguf_model_memory(Header()) is None


SEVEN_B = transformer_memory(layers=32, kv_heads=32, head_dim=128, hidden_size=4096, feed_forward=11008,
                             vocab_size=32000, weights_bytes=14_200_000_000, kv_element_bytes=2,
                             activation_element_bytes=2)


def test_a_batch_that_does_not_fit_is_refused_with_the_numbers():
    estimate = estimate_batch_memory(SEVEN_B, 64, 2048, 512)
    assert estimate.kv_cache_bytes == 524_288 * 64 * 2560
    assert estimate.weights_bytes == 14_200_000_000
    with pytest.raises(InputError) as err:
        check_batch_fits(estimate, 24_000_000_000, "cuda:0", largest_batch_that_fits=3)
    message = str(err.value)
    assert message.startswith("batch_size: batch of 64 × (2048 + 512) tokens needs ≈ 85.9 GB of KV cache plus ")
    assert "and 14.2 GB of weights" in message and "cuda:0 has 24.0 GB free" in message
    assert "expected at most 3 requests of this shape in one batch on cuda:0" in message


def test_a_batch_that_fits_or_an_unknown_device_passes():
    estimate = estimate_batch_memory(SEVEN_B, 1, 128, 128)
    check_batch_fits(estimate, 80_000_000_000, "cuda:0")
    check_batch_fits(estimate, None, "cuda:0")  # the device cannot say: the batch runs


def test_loaded_weights_are_not_counted_again():
    loaded = estimate_batch_memory(SEVEN_B, 8, 512, 128, weights_loaded=True)
    assert loaded.weights_bytes == 0 and loaded.weights_loaded_bytes == 14_200_000_000
    assert "the 14.2 GB of weights are loaded already" in loaded.describe()
    fresh = estimate_batch_memory(SEVEN_B, 8, 512, 128)
    assert fresh.total_bytes - loaded.total_bytes == 14_200_000_000


def test_the_largest_fitting_batch_is_the_boundary():
    free = 40_000_000_000
    fitting = largest_fitting_batch(SEVEN_B, 2048, 512, free, 64)
    assert 1 <= fitting < 64
    assert estimate_batch_memory(SEVEN_B, fitting, 2048, 512).total_bytes <= free
    assert estimate_batch_memory(SEVEN_B, fitting + 1, 2048, 512).total_bytes > free
    assert largest_fitting_batch(SEVEN_B, 2048, 512, 1_000_000, 64) == 0


def test_llamacpp_prefill_activations_are_bounded_by_n_batch():
    whole = estimate_batch_memory(SEVEN_B, 16, 1024, 8)
    chunked = estimate_batch_memory(SEVEN_B, 16, 1024, 8, max_tokens_per_pass=512)
    assert chunked.activation_bytes < whole.activation_bytes
    assert chunked.kv_cache_bytes == whole.kv_cache_bytes
    padded = estimate_batch_memory(SEVEN_B, 16, 100, 8, kv_tokens_per_request=256)
    assert padded.kv_cache_bytes == 524_288 * 16 * 256


def test_a_backend_refuses_a_batch_the_device_cannot_hold(small, monkeypatch):
    from engine.backends import memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2_000_000)  # a device with 2 MB free
    with pytest.raises(InputError, match=r"batch of 64 × \(1024 \+ 16\) tokens needs .*; cpu has 2.0 MB free"):
        small.generate_batch([ExactRequest(1024, 16)] * 64)
    small.generate_batch([ExactRequest(4, 2)])  # a small one still fits


def test_llamacpp_checks_memory_before_making_a_batch_context(large, monkeypatch):
    from engine.backends import memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 100_000_000)
    with pytest.raises(InputError, match=r"batch of 32 × \(512 \+ 64\) tokens needs .*cpu has 100.0 MB free; "
                                         r"expected at most \d+ requests of this shape"):
        large.generate_batch([ExactRequest(512, 64)] * 32)


# -- free memory of a device, with fakes ------------------------------------------------------

def test_free_memory_of_the_cpu_is_the_available_ram():
    assert free_memory_bytes("cpu", available_ram=lambda: 123_456) == 123_456
    assert free_memory_bytes("cpu") > 0  # this host's real reading


def test_free_memory_of_a_gpu_goes_to_its_reader():
    asked = []
    assert free_memory_bytes("cuda:1", cuda_free=lambda index: asked.append(index) or 7) == 7 and asked == [1]


class FakeNvml:
    """NVML with one GPU, raising the real pynvml error classes when told to."""

    def __init__(self, free_bytes: int, fail: type[Exception] | None = None):
        import pynvml

        self.NVMLError = pynvml.NVMLError
        self.free_bytes, self.fail, self.shut = free_bytes, fail, False

    def nvmlInit(self):
        if self.fail is not None:
            raise self.fail()

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"handle-{index}"

    def nvmlDeviceGetUUID(self, handle):
        return "GPU-00000000-0000-0000-0000-000000000000"

    def nvmlDeviceGetName(self, handle):
        return "Fake GPU"

    def nvmlDeviceGetArchitecture(self, handle):
        return 9

    def nvmlDeviceGetMemoryInfo(self, handle):
        class Info:
            free = self.free_bytes
        return Info()


def test_free_memory_of_a_gpu_from_nvml(monkeypatch):
    import pynvml

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml(24_000_000_000)
    assert cuda_free_bytes(0, nvml=nvml) == 24_000_000_000 and nvml.shut
    assert cuda_free_bytes(0, nvml=FakeNvml(1, fail=pynvml.NVMLError_DriverNotLoaded)) is None


def test_estimate_describes_itself():
    estimate = BatchMemoryEstimate(batch_size=2, input_tokens=3, output_tokens=4, kv_cache_bytes=1_500_000,
                                   activation_bytes=20_000, weights_bytes=0)
    assert estimate.describe() == ("batch of 2 × (3 + 4) tokens needs ≈ 1.5 MB of KV cache plus 20.0 kB of "
                                   "activations (≈ 1.7 MB with a 10% margin)")
