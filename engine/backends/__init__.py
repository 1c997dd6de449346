"""Inference backends behind one interface, with exact token control.

Use :func:`open_backend` to get one by its catalog name::

    with open_backend("llama.cpp", "data/models/demo-large.gguf") as backend:
        result = backend.generate(input_tokens=32, output_tokens=8)

The heavy libraries (torch, transformers, llama_cpp) are imported only by the
backend that needs them, so importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.backends.base import Backend, GenerationResult, TextResult
from engine.errors import InputError, Problem

BACKEND_NAMES = ("transformers", "llama.cpp")


def open_backend(backend: str, path: str | Path, device: str = "cpu", **options: Any) -> Backend:
    """A not-yet-loaded backend of the given kind; call ``load()`` or use it in ``with``.

    Args:
        backend: ``"transformers"`` or ``"llama.cpp"``.
        path: a Hugging Face model directory (transformers) or a ``.gguf`` file (llama.cpp).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        options: backend options, see :class:`~engine.backends.hf.TransformersBackend`
            and :class:`~engine.backends.llamacpp.LlamaCppBackend`.

    Raises:
        InputError: ``backend`` is not one of :data:`BACKEND_NAMES`.
    """
    if backend == "transformers":
        from engine.backends.hf import TransformersBackend

        return TransformersBackend(path, device, **options)
    if backend == "llama.cpp":
        from engine.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, device, **options)
    raise InputError(
        Problem(
            where="backend",
            message=f"unknown backend {backend!r}",
            expected=" or ".join(repr(name) for name in BACKEND_NAMES),
        )
    )


__all__ = ["BACKEND_NAMES", "Backend", "GenerationResult", "TextResult", "open_backend"]
