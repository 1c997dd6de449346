"""Deterministic, locally generated demo models, so the app does real inference offline.

No model hub is reachable from this machine kind, so the two demo models are made
here, from nothing but a seed and ``data/demo_corpus.txt``:

* a byte-level BPE tokenizer (GPT-2 style) trained with ``tokenizers`` on the corpus;
* ``demo-small``: a small Llama-architecture model for transformers, random weights
  from a fixed torch seed, saved with ``save_pretrained`` (safetensors) in
  ``demo-small-hf/`` together with the tokenizer;
* ``demo-large``: a larger Llama-architecture model written as ``demo-large.gguf``
  with the ``gguf`` package (f16 matrices, f32 norms, seeded numpy weights), which
  llama-cpp-python loads and runs.

The weights are random, so the generated text is gibberish; what the models are for
is measuring what inference *costs*, and the two sizes give a planner a real
trade-off. Generation is deterministic (same spec -> byte-identical files) and
idempotent: a manifest (``demo_models.json``) records the spec and the files'
sizes and hashes, and a model is rebuilt only when a file is missing or changed
size, or when its spec changed. Files are written to a temporary path and renamed,
so an interrupted run never leaves a half file that looks complete.

Run ``python -m engine.demo_models [--models-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.paths import DATA_DIR, DEFAULT_MODELS_DIR

CORPUS_PATH = DATA_DIR / "demo_corpus.txt"
MANIFEST_NAME = "demo_models.json"
# Bump when the generator's output changes for the same spec, so old files are rebuilt.
GENERATOR_VERSION = 1

SMALL_NAME, LARGE_NAME = "demo-small", "demo-large"
SMALL_DIR, LARGE_FILE = "demo-small-hf", "demo-large.gguf"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: bos, eos, pad
ACCURACY_SOURCE = "illustrative score for a random-weight demo model, not a benchmark result"


@dataclass(frozen=True)
class LlamaDims:
    """Shape of a Llama-architecture model."""

    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    context_length: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


@dataclass(frozen=True)
class DemoSpec:
    """Everything the generated files depend on (besides the corpus text)."""

    vocab_size: int = 2048
    # min_frequency 1: the corpus is small, and 2 would stop short of vocab_size.
    tokenizer_min_frequency: int = 1
    seed: int = 20240611
    weight_std: float = 0.02
    small: LlamaDims = field(
        default_factory=lambda: LlamaDims(
            hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=4, intermediate_size=344
        )
    )
    large: LlamaDims = field(
        default_factory=lambda: LlamaDims(
            hidden_size=768, n_layers=12, n_heads=12, n_kv_heads=12, intermediate_size=2048
        )
    )
    small_accuracy: float = 0.42
    large_accuracy: float = 0.58


DEFAULT_SPEC = DemoSpec()


@dataclass(frozen=True)
class DemoModel:
    """A demo model ready to be registered in the catalog.

    Attributes:
        name: catalog name, ``"demo-small"`` or ``"demo-large"``.
        backend: ``"transformers"`` or ``"llama.cpp"``.
        path: the model directory (transformers) or ``.gguf`` file (llama.cpp).
        params_b: parameter count in billions, counted from the written weights.
        accuracy: an illustrative accuracy fraction in [0, 1].
        accuracy_source: where the accuracy came from (it is illustrative).
        notes: what the model is, for people.
    """

    name: str
    backend: str
    path: Path
    params_b: float
    accuracy: float
    accuracy_source: str
    notes: str


Progress = Callable[[str], None]


# -- public entry point ------------------------------------------------------------
def ensure_demo_models(
    models_dir: Path = DEFAULT_MODELS_DIR,
    progress: Progress | None = None,
    *,
    spec: DemoSpec = DEFAULT_SPEC,
    corpus_path: Path = CORPUS_PATH,
) -> list[DemoModel]:
    """Make sure both demo models exist under ``models_dir``; build what is missing.

    Idempotent: when the manifest matches the spec and every file is present with
    its recorded size, nothing is written. Concurrent callers are serialised by a
    lock file in ``models_dir``.

    Args:
        models_dir: where the models live (created if needed).
        progress: called with one short line per step, e.g. to print it.
        spec: model shapes and seed; tests pass a tiny one.
        corpus_path: text the tokenizer is trained on.

    Returns:
        ``[demo-small, demo-large]``.
    """
    say = progress or (lambda _line: None)
    models_dir = Path(models_dir).resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    corpus_sha = _sha256_file(corpus_path)
    with _locked(models_dir / ".demo_models.lock"):
        manifest = _read_manifest(models_dir)
        entries = manifest.get("models", {}) if manifest.get("generator_version") == GENERATOR_VERSION else {}
        tokenizer: Any = None
        for name, dims in ((SMALL_NAME, spec.small), (LARGE_NAME, spec.large)):
            fingerprint = _fingerprint(spec, dims, corpus_sha)
            entry = entries.get(name)
            if entry and entry.get("fingerprint") == fingerprint and _files_intact(models_dir, entry):
                say(f"{name}: up to date")
                continue
            if tokenizer is None:
                say("training the byte-level BPE tokenizer")
                tokenizer = train_tokenizer(corpus_path, spec.vocab_size, spec.tokenizer_min_frequency)
            if name == SMALL_NAME:
                say(f"{name}: writing a transformers model to {models_dir / SMALL_DIR}")
                files = _write_small(models_dir, tokenizer, spec)
            else:
                say(f"{name}: writing a GGUF model to {models_dir / LARGE_FILE}")
                files = _write_large(models_dir, tokenizer, spec)
            entries[name] = {
                "fingerprint": fingerprint,
                "files": {rel: _file_record(models_dir / rel) for rel in files},
            }
            # Record each model as soon as it is complete, so an interruption while
            # writing the other one does not make this one be rebuilt.
            _write_manifest(models_dir, {"generator_version": GENERATOR_VERSION, "models": entries})
            say(f"{name}: done")
    return _describe(models_dir, spec)


# -- tokenizer ---------------------------------------------------------------------
def train_tokenizer(corpus_path: Path, vocab_size: int, min_frequency: int = 1) -> Any:
    """Train a GPT-2-style byte-level BPE ``tokenizers.Tokenizer`` on the corpus.

    Deterministic: the trainer breaks ties between equally frequent pairs by pair id,
    so the same corpus and settings give the same vocabulary and merges in every
    process (tests check this).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (and llama.cpp's newline probe) tokenises.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in Path(corpus_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def _vocab_and_merges(tokenizer: Any) -> tuple[list[str], list[str]]:
    """Tokens in id order and merges as ``"a b"`` strings (GGUF's form)."""
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    # tokenizers >= 0.20 stores merges as pairs, older versions as "a b" strings.
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model["merges"]]
    return tokens, merges


# -- demo-small: transformers --------------------------------------------------------
def _write_small(models_dir: Path, tokenizer: Any, spec: DemoSpec) -> list[str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from engine.backends.hf import quiet_progress_bars

    dims = spec.small
    bos, eos, pad = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.n_layers,
        num_attention_heads=dims.n_heads,
        num_key_value_heads=dims.n_kv_heads,
        max_position_embeddings=dims.context_length,
        rms_norm_eps=dims.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_theta},
        initializer_range=spec.weight_std,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )
    # The global torch RNG is borrowed for the init; restore it so callers see no change.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(rng_state)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        model_max_length=dims.context_length,
    )
    final = models_dir / SMALL_DIR
    tmp = models_dir / f".{SMALL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress_bars():
        model.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)
    for file in tmp.iterdir():
        os.chmod(file, 0o644)  # safetensors writes 0600; the app may run as another user
    _replace_dir(tmp, final)
    return sorted(f"{SMALL_DIR}/{p.name}" for p in final.iterdir() if p.is_file())


# -- demo-large: GGUF --------------------------------------------------------------
def random_llama_tensors(dims: LlamaDims, n_vocab: int, seed: int, std: float) -> dict[str, Any]:
    """Seeded random weights in llama.cpp's tensor names, in file order.

    Matrices are float16 with numpy shape (out, in), as in HF checkpoints (GGUFWriter
    reverses the order for ggml); norms are float32 ones.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden, ffn = dims.hidden_size, dims.intermediate_size
    kv_width = dims.n_kv_heads * dims.head_dim

    def matrix(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

    def norm() -> Any:
        return np.ones(hidden, dtype=np.float32)

    tensors: dict[str, Any] = {"token_embd.weight": matrix(n_vocab, hidden)}
    for layer in range(dims.n_layers):
        prefix = f"blk.{layer}."
        tensors[prefix + "attn_norm.weight"] = norm()
        tensors[prefix + "attn_q.weight"] = matrix(hidden, hidden)
        tensors[prefix + "attn_k.weight"] = matrix(kv_width, hidden)
        tensors[prefix + "attn_v.weight"] = matrix(kv_width, hidden)
        tensors[prefix + "attn_output.weight"] = matrix(hidden, hidden)
        tensors[prefix + "ffn_norm.weight"] = norm()
        tensors[prefix + "ffn_gate.weight"] = matrix(ffn, hidden)
        tensors[prefix + "ffn_up.weight"] = matrix(ffn, hidden)
        tensors[prefix + "ffn_down.weight"] = matrix(hidden, ffn)
    tensors["output_norm.weight"] = norm()
    tensors["output.weight"] = matrix(n_vocab, hidden)
    return tensors


def write_llama_gguf(
    path: Path, tokenizer: Any, dims: LlamaDims, tensors: dict[str, Any], name: str
) -> None:
    """Write a Llama-architecture GGUF file (f16 matrices) with a GPT-2-style BPE vocab.

    Written to a temporary file beside ``path`` and renamed, so ``path`` is either
    absent or complete.
    """
    from gguf import GGUFWriter, LlamaFileType, TokenType

    tokens, merges = _vocab_and_merges(tokenizer)
    special_ids = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    bos, eos, pad = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch="llama")
    writer.add_name(name)
    writer.add_context_length(dims.context_length)
    writer.add_embedding_length(dims.hidden_size)
    writer.add_block_count(dims.n_layers)
    writer.add_feed_forward_length(dims.intermediate_size)
    writer.add_head_count(dims.n_heads)
    writer.add_head_count_kv(dims.n_kv_heads)
    writer.add_rope_dimension_count(dims.head_dim)
    writer.add_rope_freq_base(dims.rope_theta)
    writer.add_layer_norm_rms_eps(dims.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TokenType.CONTROL if i in special_ids else TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)
    # The backends prepend BOS themselves; llama.cpp's own tokenize() should not.
    writer.add_add_bos_token(False)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_large(models_dir: Path, tokenizer: Any, spec: DemoSpec) -> list[str]:
    tensors = random_llama_tensors(spec.large, tokenizer.get_vocab_size(), spec.seed, spec.weight_std)
    write_llama_gguf(models_dir / LARGE_FILE, tokenizer, spec.large, tensors, LARGE_NAME)
    return [LARGE_FILE]


# -- description -------------------------------------------------------------------
def _describe(models_dir: Path, spec: DemoSpec) -> list[DemoModel]:
    from engine.backends.gguf_check import inspect_gguf
    from engine.backends.hf import count_safetensors_params

    small_path, large_path = models_dir / SMALL_DIR, models_dir / LARGE_FILE
    small_params = count_safetensors_params(small_path)
    large_params = inspect_gguf(large_path).n_params

    def notes(dims: LlamaDims, fmt: str) -> str:
        return (
            f"Demo model generated locally by engine.demo_models: Llama architecture, "
            f"{dims.n_layers} layers, hidden {dims.hidden_size}, {dims.n_heads} heads, "
            f"FFN {dims.intermediate_size}, context {dims.context_length}, {fmt}, random "
            f"weights (seed {spec.seed}). Its text is gibberish; it is here to measure "
            "inference cost."
        )

    return [
        DemoModel(
            name=SMALL_NAME,
            backend="transformers",
            path=small_path,
            params_b=small_params / 1e9,
            accuracy=spec.small_accuracy,
            accuracy_source=ACCURACY_SOURCE,
            notes=notes(spec.small, "float32 safetensors"),
        ),
        DemoModel(
            name=LARGE_NAME,
            backend="llama.cpp",
            path=large_path,
            params_b=large_params / 1e9,
            accuracy=spec.large_accuracy,
            accuracy_source=ACCURACY_SOURCE,
            notes=notes(spec.large, "GGUF f16"),
        ),
    ]


# -- files, hashes, manifest, lock ---------------------------------------------------
def _fingerprint(spec: DemoSpec, dims: LlamaDims, corpus_sha: str) -> dict[str, Any]:
    """What one model's files depend on; a change to any of it rebuilds the model."""
    return {
        "generator_version": GENERATOR_VERSION,
        "corpus_sha256": corpus_sha,
        "vocab_size": spec.vocab_size,
        "tokenizer_min_frequency": spec.tokenizer_min_frequency,
        "seed": spec.seed,
        "weight_std": spec.weight_std,
        "dims": dataclasses.asdict(dims),
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"size_bytes": path.stat().st_size, "sha256": _sha256_file(path)}


def _files_intact(models_dir: Path, entry: dict[str, Any]) -> bool:
    """Every recorded file present with its recorded size (hashing 100s of MB on every
    start would be slow; a size check catches missing and truncated files)."""
    files = entry.get("files") or {}
    if not files:
        return False
    for rel, record in files.items():
        path = models_dir / rel
        if not path.is_file() or path.stat().st_size != record.get("size_bytes"):
            return False
    return True


def _read_manifest(models_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((models_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: everything is checked and rebuilt as needed
    return data if isinstance(data, dict) else {}


def _write_manifest(models_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = models_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, models_dir / MANIFEST_NAME)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place, replacing an old one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock, so two processes never build the same files at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, generation is still atomic
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- command line ------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m engine.demo_models``: build the demo models, one line per model."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.demo_models", description="Generate the local demo models."
    )
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help=f"where to put them (default {DEFAULT_MODELS_DIR})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    for model in ensure_demo_models(args.models_dir, progress):
        print(f"{model.name}\t{model.backend}\t{model.params_b * 1e3:.2f}M params\t{model.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
