"""Fast validation of GGUF model files, before llama.cpp ever sees them.

llama.cpp may abort the whole process on a corrupt or truncated file, which would
take the caller down with it; this module reads only the header and the tensor
infos (memory-mapped, so a multi-GB file costs milliseconds) and says in one
sentence what is wrong. It also returns what the catalog wants to know, including
the parameter count counted from the tensor shapes.

The GGUF layout (little-endian): magic ``GGUF``, uint32 version, uint64 tensor
count, uint64 key/value count, the key/values, then per tensor its name, dims,
ggml type and offset, then padding to ``general.alignment`` and the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from engine.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # llama.cpp reads v2 and v3; v1 was dropped in 2023
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format of one scalar (8 = string, 9 = array).
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


class GgufError(ModelLoadError):
    """A file is not a usable GGUF model. ``reason`` is the sentence without the path."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class GgufInfo:
    """What the header of a valid GGUF file says.

    Attributes:
        path: the file.
        version: GGUF format version (2 or 3).
        architecture: ``general.architecture``, e.g. ``"llama"``.
        name: ``general.name`` or ``None``.
        context_length: trained context in tokens (``{arch}.context_length``) or ``None``.
        block_count: transformer layers (``{arch}.block_count``) or ``None``.
        embedding_length: hidden size (``{arch}.embedding_length``) or ``None``.
        vocab_size: entries of ``tokenizer.ggml.tokens`` or ``None``.
        file_type: ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE_*``) or ``None``.
        file_type_name: its name, e.g. ``"MOSTLY_F16"``, or ``None``.
        n_tensors: number of tensors.
        n_params: parameters, the element count of all tensors.
        tensor_data_bytes: bytes the tensor data needs.
        file_size_bytes: size of the file.
        head_count: attention (query) heads (``{arch}.attention.head_count``) or ``None``.
        head_count_kv: key/value heads (``{arch}.attention.head_count_kv``; ``head_count``
            when absent, as llama.cpp reads it) or ``None``.
        key_length: width of one key head (``{arch}.attention.key_length``; the embedding
            width over the heads when absent) or ``None``.
        value_length: width of one value head, likewise, or ``None``.
        feed_forward_length: feed-forward width (``{arch}.feed_forward_length``) or ``None``.
    """

    path: Path
    version: int
    architecture: str
    name: str | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    vocab_size: int | None
    file_type: int | None
    file_type_name: str | None
    n_tensors: int
    n_params: int
    tensor_data_bytes: int
    file_size_bytes: int
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    feed_forward_length: int | None = None

    @property
    def params_b(self) -> float:
        """Parameter count in billions."""
        return self.n_params / 1e9


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _ArrayLength(int):
    """The value of an array key: its length (the items themselves are skipped)."""


class _Reader:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated()
        self.pos = start + n
        return start

    def scalar(self, fmt: str) -> Any:
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.take(self.scalar("<Q"))

    def value(self, vtype: int, keep: bool) -> Any:
        """Read (or skip, for arrays) one value; arrays return their length, as an :class:`_ArrayLength`."""
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if item_type in _SCALAR_FORMATS:
                self.take(count * struct.calcsize(_SCALAR_FORMATS[item_type]))
            elif item_type in (_STRING, _ARRAY):
                if count > self.size:  # each item needs >= 1 byte: corrupt count
                    raise _Truncated()
                for _ in range(count):
                    self.value(item_type, keep=False)
            else:
                raise ValueError(f"unknown GGUF value type {item_type}")
            return _ArrayLength(count)
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_nbytes(ggml_type: int, n_elements: int) -> int | None:
    """Bytes of a tensor's data, or ``None`` for a type this gguf version does not know."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    return n_elements // block_size * type_size


def inspect_gguf(path: str | Path) -> GgufInfo:
    """Validate a GGUF file from its header and tensor infos, and describe it.

    Reads no tensor data, so it is fast on any size of file.

    Raises:
        GgufError (a :class:`~engine.errors.ModelLoadError`): the file is missing,
            not a GGUF file, a version llama.cpp does not read, has a corrupt
            header, or is truncated (tensor data extends past the end of the file).
    """
    path = Path(path)
    if not path.exists():
        raise GgufError(path, "the file does not exist; give the path of a .gguf model file.")
    if not path.is_file():
        raise GgufError(path, "is not a file; give the path of a .gguf model file.")
    size = path.stat().st_size
    if size < 24:
        raise GgufError(
            path, f"is not a GGUF model file: it has only {size} bytes, too few for a GGUF header."
        )
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(path, buf, size)


def _parse(path: Path, buf: Any, size: int) -> GgufInfo:
    version = _check_magic_and_version(path, buf)
    reader = _Reader(buf, size)
    reader.pos = 8
    try:
        values, tensors = _read_header(reader, size)
    except _Truncated:
        raise GgufError(
            path,
            f"is truncated or corrupt: its header runs past the end of the file "
            f"({size} bytes). Copy or download the file again.",
        ) from None
    except ValueError as exc:
        raise GgufError(path, f"has a corrupt header ({exc}). Copy or download the file again.") from None

    alignment = values.get("general.alignment") or DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_start = -(-reader.pos // alignment) * alignment
    if data_start + tensors.data_bytes > size:
        raise GgufError(
            path,
            f"is truncated: its tensor data needs {data_start + tensors.data_bytes} bytes but the "
            f"file has only {size}. Copy or download the file again.",
        )
    return _describe(path, version, values, tensors, size)


def _check_magic_and_version(path: Path, buf: Any) -> int:
    """The GGUF version of a file that starts like a GGUF file llama.cpp reads."""
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GgufError(
            path,
            f"is not a GGUF file: it starts with {magic!r} instead of b'GGUF'. "
            "Give a model converted to GGUF (e.g. with llama.cpp's convert_hf_to_gguf.py).",
        )
    version = struct.unpack_from("<I", buf, 4)[0]
    if version in SUPPORTED_VERSIONS:
        return version
    if struct.unpack_from(">I", buf, 4)[0] in SUPPORTED_VERSIONS:
        reason = "is a big-endian GGUF file, which this little-endian host cannot read."
    else:
        reason = (
            f"has GGUF version {version}; llama.cpp reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Convert the model again with a "
            "current llama.cpp."
        )
    raise GgufError(path, reason)


@dataclass(frozen=True)
class _Tensors:
    """What the tensor infos add up to."""

    count: int
    n_params: int
    data_bytes: int  # bytes past the data start that the tensors need


def _read_header(reader: _Reader, size: int) -> tuple[dict[str, Any], _Tensors]:
    """The key/values and tensor infos after the version; leaves ``reader`` at their end.

    Raises:
        _Truncated: the header runs past the end of the file.
        ValueError: the header is corrupt.
    """
    n_tensors = reader.scalar("<Q")
    n_kv = reader.scalar("<Q")
    # Each key/value and tensor info takes well over 8 bytes; bigger counts are garbage.
    if n_kv > size // 8 or n_tensors > size // 8:
        raise _Truncated()
    values: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string()
        vtype = reader.scalar("<I")
        values[key] = reader.value(vtype, keep=True)
    n_params = 0
    data_needed = 0
    for _ in range(n_tensors):
        reader.skip_string()
        n_dims = reader.scalar("<I")
        if n_dims > 8:
            raise ValueError(f"a tensor with {n_dims} dimensions")
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= reader.scalar("<Q")
        ggml_type = reader.scalar("<I")
        offset = reader.scalar("<Q")
        n_params += n_elements
        nbytes = _tensor_nbytes(ggml_type, n_elements)
        data_needed = max(data_needed, offset + (nbytes or 0))
    return values, _Tensors(count=n_tensors, n_params=n_params, data_bytes=data_needed)


def _describe(path: Path, version: int, values: dict[str, Any], tensors: _Tensors, size: int) -> GgufInfo:
    """The :class:`GgufInfo` of a file whose header checked out."""
    arch = values.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufError(path, "has no general.architecture key, so llama.cpp cannot load it.")

    def int_or_none(key: str, array_length: bool = False) -> int | None:
        value = values.get(key)
        if isinstance(value, _ArrayLength) != array_length:  # a per-layer array is not one number
            return None
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    file_type = int_or_none("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    name = values.get("general.name")
    embedding = int_or_none(f"{arch}.embedding_length")
    heads = int_or_none(f"{arch}.attention.head_count")  # an array (one per layer) in a few archs: unknown
    head_width = embedding // heads if embedding and heads else None

    def or_default(key: str, default: int | None) -> int | None:
        # Only an absent key takes the default; one llama.cpp reads otherwise (a per-layer array) stays unknown.
        return int_or_none(key) if key in values else default

    return GgufInfo(
        path=path,
        version=version,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=int_or_none(f"{arch}.context_length"),
        block_count=int_or_none(f"{arch}.block_count"),
        embedding_length=embedding,
        vocab_size=int_or_none("tokenizer.ggml.tokens", array_length=True),
        file_type=file_type,
        file_type_name=file_type_name,
        n_tensors=tensors.count,
        n_params=tensors.n_params,
        tensor_data_bytes=tensors.data_bytes,
        file_size_bytes=size,
        head_count=heads,
        head_count_kv=or_default(f"{arch}.attention.head_count_kv", heads),
        key_length=or_default(f"{arch}.attention.key_length", head_width),
        value_length=or_default(f"{arch}.attention.value_length", head_width),
        feed_forward_length=int_or_none(f"{arch}.feed_forward_length"),
    )
