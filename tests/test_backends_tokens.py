"""engine/backends/tokens.py: prompts counted exactly as the backend that runs them counts them."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.backends import open_backend, tokens
from engine.backends.base import FILLER_TEXT
from engine.catalog import CatalogEntry
from engine.errors import ModelLoadError
from engine.planning import workload as wl

OUTPUT_CAP = 2  # generated tokens per request: the test is about the prompt

# 16 plain prompts first: the fast counting path is checked on the first 16 prompts
# counted, so the awkward ones after them are counted by the fast path itself.
PLAIN = [f"Question {i}: what does a {word} do?" for i, word in enumerate(
    "cat dog cpu gpu planner model token prompt kernel cache batch queue meter joule watt clock".split())]
AWKWARD = [
    "Summarise the water cycle for a ten-year-old.",
    "Grüße aus Köln: naïve café, 東京タワー, Ελληνικά, emoji 🚀🙂 and ½ ≈ 0.5",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew lines\n\n   inside",
    " ",
    "\n\t ",
    "?",
    FILLER_TEXT * 8 + "And that is the end.",
]
PROMPTS = PLAIN + AWKWARD


def entry_of(demo) -> CatalogEntry:
    return CatalogEntry(name=demo.name, backend=demo.backend, accuracy=demo.accuracy,
                        accuracy_source=demo.accuracy_source, path=str(demo.path))


def entry(name: str, backend: str = "transformers", path: str | None = "somewhere") -> CatalogEntry:
    return CatalogEntry(name=name, backend=backend, accuracy=0.5, accuracy_source="test", path=path)


def planned_input_tokens(model: CatalogEntry, prompts: list[str]) -> np.ndarray:
    """τin of each prompt as a plan counts it: a workload of these prompts through planning_tokens."""
    csv_text = "prompt,output_tokens\n" + "".join(f"placeholder {i},{OUTPUT_CAP}\n" for i in range(len(prompts)))
    workload = wl.parse_workload(csv_text, "awkward.csv")
    # Exact strings: a CSV cell is stripped, but a workload made in code or stored keeps them.
    workload.queries["prompt"] = pd.Series(prompts, dtype=object)
    planned = wl.planning_tokens(workload, [model])
    assert planned.input_source[model.name] == wl.INPUT_SOURCE_TOKENIZER
    return planned.input_tokens[model.name]


# -- the planned τin is what the backend feeds the model --------------------------------

@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def served(request, demo_models):
    demo = demo_models[request.param]
    with open_backend(demo.backend, demo.path) as backend:
        yield entry_of(demo), backend


def test_planned_input_tokens_are_what_the_backend_feeds_the_model(served):
    model, backend = served
    planned = planned_input_tokens(model, PROMPTS)
    bos_id = backend.prompt_tokenizer.bos_id
    assert bos_id is not None  # both demo models start prompts with BOS
    for prompt, tau_in in zip(PROMPTS, planned.tolist(), strict=True):
        result = backend.generate_text(prompt, OUTPUT_CAP)
        assert result.input_tokens == tau_in, f"{model.name}: {prompt[:40]!r}"
        assert len(backend.last_prompt_ids) == tau_in and backend.last_prompt_ids[0] == bos_id
        assert 1 <= result.output_tokens <= OUTPUT_CAP
        if backend.name == "llama.cpp":
            # llama.cpp's own count: the prompt plus the generated tokens fed back (all but the last)
            assert backend._llm.n_tokens == tau_in + result.output_tokens - 1
    assert planned[-1] > 300  # the long prompt is long, the whitespace ones are not empty
    assert min(planned) >= 1


def test_the_transformers_counter_takes_the_fast_path_on_the_demo_tokenizer(demo_models):
    counter = tokens.prompt_counter("transformers", demo_models["transformers"].path, model_name="demo-small")
    counter.count_prompts(PROMPTS)
    assert isinstance(counter, tokens.HfPromptTokenizer) and counter.fast_batch_counting


def test_backend_count_tokens_has_no_special_tokens(served):
    _, backend = served
    assert backend.count_tokens("Hi there") == len(backend.prompt_tokenizer.prompt_ids("Hi there")) - 1


# -- counting with the model's own tokenizer (moved from test_planning_workload.py) ----------------

def test_demo_small_counts_with_its_own_tokenizer(demo_models):
    from transformers import AutoTokenizer

    demo = entry_of(demo_models["transformers"])
    prompts = ["Summarise the water cycle for a ten-year-old.", "Hi", "Write a haiku about autumn, please."]
    counts = wl.count_prompt_tokens(demo, prompts)
    tokenizer = AutoTokenizer.from_pretrained(demo_models["transformers"].path, local_files_only=True)
    own = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in prompts]  # + the BOS the backend adds
    assert tokenizer.bos_token_id is not None
    assert counts.tolist() == own and (counts > 1).all()
    # loaded once: planning again reuses the cached tokenizer
    assert wl._local_counter(demo) is wl._local_counter(demo)


def test_demo_large_counts_with_its_gguf_vocabulary(demo_models):
    import llama_cpp

    demo = entry_of(demo_models["llama.cpp"])
    prompts = ["Summarise the water cycle for a ten-year-old.", "What does CPU stand for?"]
    counts = wl.count_prompt_tokens(demo, prompts)
    vocab = llama_cpp.Llama(model_path=str(demo_models["llama.cpp"].path), vocab_only=True, verbose=False)
    own = [len(vocab.tokenize(p.encode("utf-8"), add_bos=False, special=False)) + 1 for p in prompts]
    assert counts.tolist() == own and (counts > 1).all()
    assert tokens.gguf_bos_id(vocab) == llama_cpp.llama_vocab_bos(tokens.llama_vocab(vocab))


def test_a_tokenizer_that_cannot_load_is_a_model_load_error(tmp_path: Path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (broken / "tokenizer.json").write_text("not json")
    with pytest.raises(ModelLoadError, match="tokenizer of broken could not be loaded"):
        wl.count_prompt_tokens(entry("broken", path=str(broken)), ["hi"])
    with pytest.raises(ModelLoadError, match="does not exist"):
        wl.count_prompt_tokens(entry("gone", path=str(tmp_path / "gone")), ["hi"])
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ModelLoadError, match="tokenizer of fake"):
        wl.count_prompt_tokens(entry("fake", backend="llama.cpp", path=str(not_gguf)), ["hi"])
    with pytest.raises(ModelLoadError, match="is not a directory, so it has no transformers tokenizer"):
        wl.count_prompt_tokens(entry("file", path=str(not_gguf)), ["hi"])
    with pytest.raises(ModelLoadError, match="unknown backend 'vllm'; fix the model in the catalog"):
        wl.count_prompt_tokens(entry("odd", backend="vllm", path=str(broken)), ["hi"])


# -- the cache --------------------------------------------------------------------------

def test_the_cache_is_keyed_by_modification_time(demo_models, tmp_path: Path):
    copy = tmp_path / "copy-hf"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(demo_models["transformers"].path / name, copy / name)
    first = tokens.prompt_counter("transformers", copy, model_name="copy")
    assert tokens.prompt_counter("transformers", copy, model_name="copy") is first
    later = time.time_ns() + 10**9  # newer than the directory and every file in it
    os.utime(copy / "tokenizer.json", ns=(later, later))
    second = tokens.prompt_counter("transformers", copy, model_name="copy")
    assert second is not first  # a model replaced on disk is loaded afresh
    assert second.count_prompts(["Hi there"]).tolist() == first.count_prompts(["Hi there"]).tolist()


# -- the BOS rule and the fast path's check, with fakes -----------------------------------

def test_bos_prefix_is_the_one_rule():
    assert tokens.bos_prefix(0) == [0] and tokens.bos_prefix(None) == []


class FakeRustTokenizer:
    """Stands in for tokenizers.Tokenizer: counts characters, unlike the tokenizer it belongs to."""

    truncation = None
    padding = None

    def __init__(self):
        self.calls = 0

    def encode_batch_fast(self, prompts, add_special_tokens):
        self.calls += 1
        return [list(p) for p in prompts]


class FakeHfTokenizer:
    """A transformers-like tokenizer that splits on spaces; ``bos_token_id`` as given."""

    is_fast = True

    def __init__(self, bos_token_id, rust):
        self.bos_token_id = bos_token_id
        self.backend_tokenizer = rust

    def __call__(self, text, add_special_tokens, verbose, return_attention_mask=True):
        assert add_special_tokens is False
        split = (lambda t: list(range(len(t.split()))))
        return {"input_ids": [split(t) for t in text] if isinstance(text, list) else split(text)}


def test_a_fast_path_that_disagrees_is_not_used():
    rust = FakeRustTokenizer()
    counter = tokens.HfPromptTokenizer(FakeHfTokenizer(7, rust))
    assert counter.count_prompts(["one two", "three"]).tolist() == [3, 2]  # words + BOS, not characters
    assert not counter.fast_batch_counting and rust.calls == 1  # tried once, on the sample
    assert counter.count_prompts(["a b c"]).tolist() == [4] and rust.calls == 1
    assert counter.prompt_ids("one two") == [7, 0, 1]


def test_a_model_without_bos_counts_the_prompt_only():
    counter = tokens.HfPromptTokenizer(FakeHfTokenizer(None, FakeRustTokenizer()))
    assert counter.count_prompts(["one two"]).tolist() == [2] and counter.prompt_ids("one two") == [0, 1]
    assert counter.count_prompts([]).tolist() == []
