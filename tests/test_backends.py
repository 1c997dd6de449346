"""Backends: exact token control on both demo models, and a clear error for bad input."""

from __future__ import annotations

import shutil
import struct

import pytest

from engine.backends import open_backend
from engine.backends.base import FILLER_TEXT, GenerationResult, parse_device, prompt_ids
from engine.backends.gguf_check import GgufError, inspect_gguf
from engine.demo_models import (
    CORPUS_PATH,
    DEFAULT_MODELS_DIR,
    DemoSpec,
    LlamaDims,
    ensure_demo_models,
    random_llama_tensors,
    train_tokenizer,
    write_llama_gguf,
)
from engine.errors import (
    DeviceUnavailableError,
    InputError,
    ModelLoadError,
    TokenCountMismatchError,
)

EOS_ID = 1  # "</s>" in the demo tokenizer
TINY = DemoSpec(
    vocab_size=300,
    small=LlamaDims(16, 1, 2, 2, 32, context_length=64),
    large=LlamaDims(32, 2, 2, 1, 64, context_length=128),
)


@pytest.fixture(scope="session")
def demo():
    small, large = ensure_demo_models(DEFAULT_MODELS_DIR)
    return {"small": small, "large": large}


@pytest.fixture(scope="module")
def small(demo):
    backend = open_backend("transformers", demo["small"].path)
    backend.load()
    backend.generate(8, 8)  # warm-up: the first calls pay one-off costs
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def large(demo):
    backend = open_backend("llama.cpp", demo["large"].path)
    backend.load()
    backend.generate(8, 8)
    yield backend
    backend.close()


@pytest.fixture(params=["small", "large"])
def backend(request):
    return request.getfixturevalue(request.param)


# -- exact token control -------------------------------------------------------------
@pytest.mark.parametrize("tau_in,tau_out", [(1, 1), (8, 8), (37, 5), (128, 24)])
def test_generates_exactly_the_asked_counts(backend, tau_in, tau_out):
    result = backend.generate(tau_in, tau_out)
    assert isinstance(result, GenerationResult)
    assert (result.input_tokens, result.output_tokens) == (tau_in, tau_out)
    assert 0 < result.time_to_first_token_s <= result.runtime_s


def test_numpy_integers_are_accepted(backend):
    import numpy as np

    result = backend.generate(np.int64(9), np.int32(3))
    assert (result.input_tokens, result.output_tokens) == (9, 3)
    assert type(result.input_tokens) is int


def test_both_demo_models_share_one_tokenizer(small, large):
    assert small.count_tokens(FILLER_TEXT) == large.count_tokens(FILLER_TEXT) > 20
    assert small.context_length == large.context_length == 4096


def test_longer_answers_take_longer(backend):
    # min of three runs each, interleaved: a slow spell (another process on the cores) hits both
    runs = [(backend.generate(8, 8).runtime_s, backend.generate(8, 64).runtime_s) for _ in range(3)]
    short, long = min(r[0] for r in runs), min(r[1] for r in runs)
    assert long > short


def test_large_model_costs_more_per_output_token(small, large):
    def per_token_s(backend):
        # min of three runs each: a stray slow run (GC, another process) must not decide
        short = min(backend.generate(8, 8).runtime_s for _ in range(3))
        long = min(backend.generate(8, 40).runtime_s for _ in range(3))
        return (long - short) / 32

    small_s, large_s = per_token_s(small), per_token_s(large)
    assert large_s > 1.5 * small_s, f"{large_s * 1e3:.1f} vs {small_s * 1e3:.1f} ms/token"


def test_llamacpp_prompt_cache_is_not_reused(large):
    # With prefix reuse the second identical request would skip its 128-token
    # prefill and take a small fraction of the time.
    first = large.generate(128, 1)
    second = large.generate(128, 1)
    assert second.input_tokens == 128
    assert second.runtime_s > 0.5 * first.runtime_s


def test_prompt_ids_are_exact_and_start_with_bos():
    assert prompt_ids([5, 6, 7], 0, 8) == [0, 5, 6, 7, 5, 6, 7, 5]
    assert prompt_ids([5, 6, 7], None, 2) == [5, 6]
    assert prompt_ids([5, 6, 7], 0, 1) == [0]


# -- a model that wants to stop at once ---------------------------------------------
@pytest.fixture(scope="module")
def eos_models(tmp_path_factory):
    """Tiny models rigged so greedy decoding picks EOS at every step.

    Residual dimension 0 is held at 1 (embedding column 0 = 1, no layer writes to
    it), and the output head reads only that dimension for EOS, so EOS wins.
    """
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eos")
    ensure_demo_models(root / "tiny", spec=TINY)

    hf_dir = root / "eos-hf"
    shutil.copytree(root / "tiny" / "demo-small-hf", hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS_ID, 0] = 60.0
    model.save_pretrained(hf_dir)

    tokenizer = train_tokenizer(CORPUS_PATH, TINY.vocab_size)
    tensors = random_llama_tensors(TINY.large, tokenizer.get_vocab_size(), seed=7, std=0.02)
    tensors["token_embd.weight"][:, 0] = 1.0
    for name, array in tensors.items():
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            array[0, :] = 0.0
    tensors["output.weight"][:, 0] = 0.0
    tensors["output.weight"][EOS_ID, 0] = 60.0
    gguf_path = root / "eos.gguf"
    write_llama_gguf(gguf_path, tokenizer, TINY.large, tensors, "eos")
    return {"transformers": hf_dir, "llama.cpp": gguf_path}


def test_rigged_models_do_want_eos(eos_models):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(eos_models["transformers"], local_files_only=True)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 50, 60, 70]])).logits
    assert int(logits[0, -1].argmax()) == EOS_ID

    llm = llama_cpp.Llama(str(eos_models["llama.cpp"]), n_ctx=128, verbose=False)
    try:
        first = next(llm.generate([0, 50, 60, 70], temp=0.0))
    finally:
        llm.close()
    assert first == EOS_ID


@pytest.mark.parametrize("kind", ["transformers", "llama.cpp"])
def test_eos_is_suppressed(eos_models, kind):
    with open_backend(kind, eos_models[kind]) as backend:
        result = backend.generate(10, 30)
        output_ids = backend.last_output_ids
    assert (result.input_tokens, result.output_tokens) == (10, 30)
    # llama-cpp-python's generate() would not stop at EOS, it would emit it and go on;
    # the answer must be free of it all the same.
    assert len(output_ids) == 30 and EOS_ID not in output_ids


# -- bad requests -------------------------------------------------------------------
@pytest.mark.parametrize("tau_in,tau_out,field", [
    (0, 8, "input_tokens"), (8, 0, "output_tokens"), (-3, 8, "input_tokens"),
    (8, -1, "output_tokens"), (2.5, 8, "input_tokens"), (True, 8, "input_tokens"),
])
def test_non_positive_counts_are_refused(backend, tau_in, tau_out, field):
    with pytest.raises(InputError) as err:
        backend.generate(tau_in, tau_out)
    assert err.value.problems[0].where == field
    assert "whole number of tokens >= 1" in str(err.value)


def test_request_beyond_the_context_is_refused(backend):
    with pytest.raises(InputError, match="exceeds the context length of 4096 tokens") as err:
        backend.generate(4000, 97)
    assert err.value.problems[0].expected == "at most 4096 tokens in total"


def test_unknown_backend_is_refused():
    with pytest.raises(InputError, match="unknown backend 'vllm'"):
        open_backend("vllm", "anything")


# -- bad models ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["transformers", "llama.cpp"])
def test_missing_path(tmp_path, kind):
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_backend(kind, tmp_path / "nope.gguf").load()


def test_directory_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        open_backend("transformers", tmp_path).load()


def test_directory_with_broken_weights(demo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo["small"].path, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        open_backend("transformers", broken).load()


def test_gguf_file_given_to_transformers(demo):
    with pytest.raises(ModelLoadError, match="llama.cpp backend"):
        open_backend("transformers", demo["large"].path).load()


def test_directory_given_to_llamacpp(demo):
    with pytest.raises(ModelLoadError, match="needs a .gguf file"):
        open_backend("llama.cpp", demo["small"].path).load()


def test_truncated_gguf(demo, tmp_path):
    cut = tmp_path / "cut.gguf"
    with demo["large"].path.open("rb") as src:
        cut.write_bytes(src.read(demo["large"].path.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="is truncated: its tensor data needs"):
        open_backend("llama.cpp", cut).load()


def test_gguf_cut_inside_its_header(demo, tmp_path):
    cut = tmp_path / "head.gguf"
    with demo["large"].path.open("rb") as src:
        cut.write_bytes(src.read(5000))
    with pytest.raises(GgufError, match="truncated or corrupt: its header runs past"):
        inspect_gguf(cut)


def test_text_file_renamed_gguf(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("These are my notes about models, not a model.\n" * 10)
    with pytest.raises(ModelLoadError, match=r"is not a GGUF file: it starts with b'Thes'"):
        open_backend("llama.cpp", fake).load()


def test_old_gguf_version(tmp_path):
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0) + b"\x00" * 64)
    with pytest.raises(GgufError, match="GGUF version 1"):
        inspect_gguf(old)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GgufError, match="only 0 bytes"):
        inspect_gguf(empty)


def test_gguf_info_of_the_demo_model(demo):
    info = inspect_gguf(demo["large"].path)
    assert info.architecture == "llama" and info.version == 3
    assert info.block_count == 12 and info.embedding_length == 768 and info.vocab_size == 2048
    assert info.tensor_data_bytes <= info.file_size_bytes
    assert info.params_b == pytest.approx(demo["large"].params_b)


# -- devices ------------------------------------------------------------------------
def test_cuda_on_this_host(demo):
    import torch

    if torch.cuda.device_count() > 0:
        pytest.skip("this host has a CUDA GPU")
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        open_backend("transformers", demo["small"].path, device="cuda:0").load()
    with pytest.raises(DeviceUnavailableError, match="no GPU support.*GGML_CUDA=on"):
        open_backend("llama.cpp", demo["large"].path, device="cuda:0").load()


def test_cuda_index_past_the_last_gpu(demo):
    import torch

    n_gpus = torch.cuda.device_count()
    with pytest.raises(DeviceUnavailableError, match="cuda:3"):
        open_backend("transformers", demo["small"].path, device=f"cuda:{max(n_gpus, 3)}").load()


@pytest.mark.parametrize("kind,key", [("transformers", "small"), ("llama.cpp", "large")])
def test_unknown_device(demo, kind, key):
    with pytest.raises(DeviceUnavailableError, match="Unknown device 'tpu:0'"):
        open_backend(kind, demo[key].path, device="tpu:0").load()


def test_parse_device():
    assert parse_device("cpu") == parse_device(" CPU ")
    assert (parse_device("cuda").index, parse_device("cuda:2").index) == (None, 2)
    assert parse_device("gpu:1").kind == "cuda"


# -- options ------------------------------------------------------------------------
def test_dtype_option(eos_models):
    with open_backend("transformers", eos_models["transformers"], dtype="bfloat16") as backend:
        assert backend.settings["dtype"] == "bfloat16"
        assert backend.generate(4, 3).output_tokens == 3
    with pytest.raises(ModelLoadError, match="Unknown dtype 'float8'"):
        open_backend("transformers", eos_models["transformers"], dtype="float8").load()


def test_settings_are_recorded(small, large):
    import os

    from engine.backends.base import thread_counts

    assert small.settings["dtype"] == "float32"
    assert small.settings["torch_threads"] == thread_counts({}, len(os.sched_getaffinity(0)))[0]
    assert large.settings["file_type"] == "MOSTLY_F16"
    # What the model was loaded with is what the measurements' provenance says.
    assert (large.settings["n_threads"], large.settings["n_threads_batch"]) == thread_counts(
        {}, len(os.sched_getaffinity(0)))


def test_threads_default_to_half_the_cpus():
    from engine.backends.base import thread_counts

    assert thread_counts({}, allowed=2) == (1, 1)
    assert thread_counts({}, allowed=16) == (8, 8)
    assert thread_counts({}, allowed=1) == (1, 1)
    assert thread_counts({"n_threads": 3}, allowed=16) == (3, 3)  # one option given: both
    assert thread_counts({"n_threads": 3, "n_threads_batch": 6}, allowed=16) == (3, 6)
    assert thread_counts({"n_threads_batch": 4}, allowed=2) == (1, 4)


def test_llamacpp_detects_a_reused_prompt_cache(eos_models, monkeypatch):
    # Disable the reset the backend does before each request: llama-cpp-python then
    # reuses the previous prompt's KV cache, and the read-back must catch it.
    with open_backend("llama.cpp", eos_models["llama.cpp"]) as backend:
        backend.generate(10, 3)
        monkeypatch.setattr(backend._llm, "reset", lambda: None)
        with pytest.raises(TokenCountMismatchError, match="part of the prompt came from a cache"):
            backend.generate(10, 3)


def test_transformers_detects_a_short_answer(eos_models, monkeypatch):
    # A library that stops one token early must not yield a silent row.
    with open_backend("transformers", eos_models["transformers"]) as backend:
        real_generate = backend._model.generate

        def stops_early(**kwargs):
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"] = kwargs["max_new_tokens"] - 1
            return real_generate(**kwargs)

        monkeypatch.setattr(backend._model, "generate", stops_early)
        with pytest.raises(TokenCountMismatchError, match="asked for 6 input and 5 output tokens"):
            backend.generate(6, 5)


def test_transformers_batches_identical_requests(demo_models):
    """A batch of 4 identical requests reports per-request counts and its batch size."""
    from engine.backends import open_backend

    small = demo_models["transformers"]
    with open_backend("transformers", small.path, batch_size=4) as backend:
        result = backend.generate(16, 8)
        assert (result.input_tokens, result.output_tokens, result.batch_size) == (16, 8, 4)
        assert backend.settings["batch_size"] == 4


def test_batch_size_is_checked(demo_models):
    from engine.backends import open_backend
    from engine.errors import InputError

    with pytest.raises(InputError, match="not supported by the llama.cpp backend"):
        open_backend("llama.cpp", demo_models["llama.cpp"].path, batch_size=2)
    with pytest.raises(InputError, match="batch_size"):
        open_backend("transformers", demo_models["transformers"].path, batch_size=0)
