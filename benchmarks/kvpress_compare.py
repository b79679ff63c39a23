"""kvpolicy and NVIDIA kvpress side by side: same model, inputs, tasks and ratios, one table.

Why: kvpolicy's policies should be judged against the independent implementation users would
pick instead. One process runs both libraries through ``kvpolicy.evaluation.runner.run_compare``
(the engine of ``kvpolicy sweep``): kvpolicy's policies as usual, and each kvpress press as a
spec whose cache is a plain ``DynamicCache`` carrying the press. So every row shares the same
prepared inputs, the same ``full`` reference (``ppl_ratio``, ``agreement``, ``kv_reduction``)
and the same measurement code.

How kvpress is driven (as its own ``press(model)`` context does): each attention layer gets
``rotary_emb`` and a forward hook; the hook calls ``press.forward_hook`` when the forward's cache
carries a press, so the press compresses the prompt after the prefill's attention and never
touches later tokens (kvpress's design: it compresses only the forward that fills an empty cache).
Two things kvpress leaves to its own pipeline are done here: ``PressCache.get_seq_length()``
counts the tokens seen, not kept, so forwards that pass no positions (the ``ppl`` task's scored
chunks) and ``generate`` continuing a compressed cache get the true positions, as
``KVPressTextGenerationPipeline.generate_answer`` passes them; and multi-token forwards on a
compressed cache get each layer's own causal mask, since transformers builds one mask from
layer 0's length and PyramidKVPress's layers keep different counts. KVzipPress, whose context
must wrap the prefill (it runs its reconstruction passes on leaving), is entered and left around
the forward that fills a fresh cache; it masks the keys it evicts (kvpress's attention patch)
instead of removing them, and the masked ones count as removed in the KV columns.

The RULER-style suite (``--suite ruler``) takes ``kvpolicy compare``'s input options, built by the
same code (``kvpolicy.cli.add_input_arguments`` and ``build_sizes``), so the same flags give the
same samples. ``--question in-prompt`` (default): each press compresses the whole prompt, question
included. ``--question after-context``: the context is prefilled (and compressed) alone, then
``generate`` continues the cache with the question, which no press compresses: the setting of
kvpress's own pipeline. Presses run at batch size 1 (their compression assumes no padding);
``--batch-size`` batches kvpolicy's policies only in a run without presses (``--presses ''``).
One process per press (``--kvpolicy '' --presses X``, each with its own ``full`` row) and the
files merged with ``--merge a.json b.json ...`` is how a GPU runs them side by side
(docs/benchmarks/ruler.md, "kvpress side by side (GPU)").

kvpress needs transformers<5.3 and kvpolicy supports >=5.2, so both run in one environment.
The recorded run (docs/benchmarks/kvpress_compare.md)::

    python3 -m venv --system-site-packages /tmp/kvp
    /tmp/kvp/bin/pip install "transformers>=5.2,<5.3" kvpress
    /tmp/kvp/bin/pip install --no-deps -e .
    OMP_NUM_THREADS=1 /tmp/kvp/bin/python benchmarks/kvpress_compare.py --threads 1 \\
        --ratios 0.2,0.4,0.6,0.8 --sizes sweep \\
        --json docs/benchmarks/kvpress_compare.json --out docs/benchmarks/raw/kvpress_compare_tables.md

and its SnapKV settings swap (each library with the other's window and kernel size)::

    OMP_NUM_THREADS=1 /tmp/kvp/bin/python benchmarks/kvpress_compare.py --threads 1 \\
        --ratios 0.4,0.8 --sizes sweep --tasks needle --kvpolicy full,snapkv --presses snapkv \\
        --policy-settings snapkv:window_size=64,kernel_size=5 --press-settings snapkv:window_size=32,kernel_size=7 \\
        --json docs/benchmarks/raw/kvpress_snapkv_swapped_settings.json \\
        --out docs/benchmarks/raw/kvpress_snapkv_swapped_settings.md

kvpolicy's ``attention_hook.install()`` is called before kvpress is imported: kvpress patches the
attention functions on import into a mapping that shadows the one kvpolicy wraps.

``--press-cache quanto4`` runs every press (and the no-press row) on transformers' ``QuantizedCache``
(optimum-quanto, 4 bits, its default groups of 64 and residual of 128; kvpress dequantizes, prunes and
re-quantizes each layer): issue #25's kvpress anchor for kvpolicy's ``--kv-dtype``. Its KV bytes count the
packed codes, scales and shifts. ``--kv-dtype`` runs kvpolicy's policies at each given ``kv_dtype``.

A press that fails a short check run (before any timed work) is skipped and listed under
``skipped`` in the JSON with its error.

The JSON: ``meta`` (``kvpolicy.provenance.run_meta``: command and argv, git commit with a dirty
flag, versions, machine and threads, date), ``environment`` (the versions, CPU and command in
the form the Markdown report reads; files written before ``meta`` existed have only this),
``sizes``, ``suite``, ``size_values``, ``tasks``, ``ratios``, ``wall_s``, ``skipped`` and ``rows``;
``partial: true`` while the run is going (the file is rewritten after each row, so a run stopped
by a time limit keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpolicy.core import attention_hook  # noqa: E402
from kvpolicy.evaluation import tasks as task_mod  # noqa: E402
from kvpolicy.evaluation.report import environment  # noqa: E402
from kvpolicy.evaluation.runner import PolicySpec, build_specs, run_compare  # noqa: E402
from kvpolicy.provenance import run_meta  # noqa: E402

#: press name on the command line -> kvpress class name
PRESSES = {
    "snapkv": "SnapKVPress",
    "pyramidkv": "PyramidKVPress",
    "streamingllm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
    "kvzip": "KVzipPress",
    "observed_attention": "ObservedAttentionPress",
}
#: kvpolicy policy <-> kvpress press compared cell by cell in the pivot
PAIRS = {"snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress", "streamingllm": "StreamingLLMPress",
         "tova": "TOVAPress", "knorm": "KnormPress", "expected_attention": "ExpectedAttentionPress",
         "kvzip": "KVzipPress"}
#: kvpolicy variants accepted in --kvpolicy: name -> (policy, extra settings)
VARIANTS = {"streamingllm_prefill": ("streamingllm", {"compress": "prefill"})}
#: defaults of --kvpolicy and --presses for the ppl/needle/agreement tasks, and for --suite ruler (the
#: issue's presses and each one's kvpolicy counterpart; kvzip_smollm2: KVzip's reconstruction prompt
#: in SmolLM2's tokens, the default model's)
DEFAULTS = {
    "tasks": ("full,h2o,streamingllm,streamingllm_prefill,snapkv,pyramidkv",
              "snapkv,pyramidkv,streamingllm,tova,expected_attention,knorm"),
    "ruler": ("full,snapkv,pyramidkv,tova,knorm,streamingllm,expected_attention,kvzip_smollm2",
              "snapkv,pyramidkv,tova,knorm,streamingllm,expected_attention,kvzip"),
}
#: tokens of the forward on a compressed cache in a press's check run with ``--question after-context``
#: (about a RULER question with its answer prefix and the chat template's turn markers)
QUESTION_TOKENS = 64
#: modules that ``import kvpress`` imports for presses this script does not run (DuoAttentionPress's
#: data set download, ExpectedAttentionStatsPress's command line) -> the names it takes from them
OPTIONAL_IMPORTS = {"datasets": ("load_dataset",), "fire": ("Fire",)}


def import_kvpress() -> Any:
    """``import kvpress`` the way this script needs it.

    kvpolicy's attention wrapper is installed first: kvpress patches the attention functions on
    import into a mapping that shadows the one kvpolicy wraps. Where ``datasets`` or ``fire`` is
    missing (the GPU image: ``datasets`` needs pyarrow and pandas, 50 MB of wheels), a stand-in
    that raises when called takes its place for the import alone, then is removed again, so no
    other code sees it; no press run here calls them."""
    import importlib.util
    import types

    if "kvpress" in sys.modules:  # called in every layer's hook: return at once
        return sys.modules["kvpress"]
    attention_hook.install()
    added = []
    for name, attrs in OPTIONAL_IMPORTS.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            for attr in attrs:
                setattr(stub, attr, _missing(name))
            sys.modules[name] = stub
            added.append(name)
    try:
        import kvpress
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return kvpress


def _missing(module: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{module} is not installed (kvpress_compare.py imported kvpress without it)")

    return call


def wraps_prefill(press: Any) -> bool:
    """Whether the press's own context (``press(model)``) must wrap the prefill: KVzip's scores
    come from reconstruction passes that its context runs on leaving, over the prompt it saw."""
    return _wraps_prefill(type(press))


@functools.cache
def _wraps_prefill(press_class: type) -> bool:
    return press_class.__call__ is not import_kvpress().BasePress.__call__


# --------------------------------------------------------------------------- kvpress side
class _PressCacheMixin:
    """What a cache carrying a press adds (:class:`PressCache` over ``DynamicCache``,
    :class:`QuantizedPressCache` over transformers' ``QuantizedCache``): it carries the press
    compressing it, counts the tokens it has seen (kept or not) and reports what the Meter reads
    from kvpolicy's ``PolicyCache``.

    ``get_seq_length()`` is the tokens seen, as kvpolicy's cache reports it, not the tokens kept:
    the model and ``generate`` derive the new tokens' positions and which input columns are new
    from it, so a forward that passes no positions (the ``ppl`` task's scored chunks) and a
    ``generate`` that continues a compressed context with the question (``--question
    after-context``) see the true positions, as ``KVPressTextGenerationPipeline.generate_answer``
    passes them. The masks' sizes come from each layer's kept length, as in kvpress.

    ``modules``: the attention modules, when the press masks keys rather than removing them
    (KVzip's ``masked_key_indices``, read by kvpress's attention patch); the masked ones are then
    counted as removed in ``kv_tokens_per_layer`` and in ``memory_bytes(allocated=False)`` (what a
    real eviction would hold); ``memory_bytes(allocated=True)`` stays what is held."""

    def __init__(self, press: Any = None, modules: list[Any] | None = None, **cache_kwargs: Any) -> None:
        super().__init__(**cache_kwargs)
        self.press = press
        self.modules = modules
        self.seen = 0
        #: the press's own context while it wraps this cache's prefill (:func:`_context_hooks`)
        self.context: Any = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self.seen += int(key_states.shape[-2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def kept(self, layer_idx: int) -> int:
        """Tokens held by one layer (masked keys included)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer.get_seq_length() if layer is not None else 0

    def masked(self, layer_idx: int) -> int:
        """(head, token) entries of one layer that the press masks instead of removing."""
        if not self.modules:
            return 0
        indices = getattr(self.modules[layer_idx], "masked_key_indices", None)
        return 0 if indices is None else int(indices[0].numel())

    def kv_tokens_per_layer(self) -> list[int]:
        return [self.kept(i) - round(self.masked(i) / self.heads(i)) for i in range(len(self.layers))]

    def heads(self, layer_idx: int) -> int:
        layer = self.layers[layer_idx]
        return layer.keys.shape[1] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 1

    def memory_bytes(self, allocated: bool = True) -> int:
        total = 0
        for i, layer in enumerate(self.layers):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and t.numel():
                    total += t.numel() * t.element_size()
                    if not allocated:
                        total -= self.masked(i) * t.shape[-1] * t.element_size()
        return total


class PressCache(_PressCacheMixin, DynamicCache):
    """kvpress's usual cache: a ``DynamicCache`` carrying the press."""


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass made of inner tensors (optimum-quanto's packed 4-bit codes,
    scales and shifts) counts each inner tensor."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor:
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class QuantizedPressCache(_PressCacheMixin, QuantizedCache):
    """transformers' ``QuantizedCache`` (optimum-quanto, KIVI-style: the prompt quantized at once, the newest
    ``residual_length`` generated tokens in 16 bits, then re-quantized with the rest) carrying the press, as
    kvpress combines them: each press dequantizes the layer, prunes and re-quantizes (``BasePress.forward_hook``).
    ``memory_bytes`` counts the 4-bit codes, scales and shifts and the 16-bit residual; masked keys (KVzip) are
    taken off at the layer's bytes per (head, token) entry."""

    def heads(self, layer_idx: int) -> int:
        q = getattr(self.layers[layer_idx], "_quantized_keys", None)
        return q.shape[1] if q is not None and q.dim() == 4 else super().heads(layer_idx)

    def memory_bytes(self, allocated: bool = True) -> int:
        total = 0
        for i, layer in enumerate(self.layers):
            held = sum(_tensor_bytes(t) for t in (getattr(layer, "_quantized_keys", None),
                                                  getattr(layer, "_quantized_values", None),
                                                  getattr(layer, "keys", None), getattr(layer, "values", None))
                       if t is not None and t.numel())
            entries = self.kept(i) * self.heads(i)
            if not allocated and entries and self.masked(i):
                held -= round(held * self.masked(i) / entries)
            total += held
        return total


def _press_hook(module, args, kwargs, output):
    press = getattr(kwargs.get("past_key_values"), "press", None)
    if press is None or wraps_prefill(press):  # such a press runs its own hooks inside its context
        return output
    return press.forward_hook(module, args, kwargs, output)


def _mask_hook(module, args, kwargs):
    """A multi-token forward on a compressed ``PressCache`` (the ``ppl`` task's scored chunks, the
    question after the context, KVzip's reconstruction) gets this layer's own mask: every kept
    token plus causal among the new ones. transformers builds one mask from layer 0's length and
    the true positions, which breaks presses whose layers keep different counts (PyramidKVPress)
    and, once tokens were removed, causality among the new ones (batch size 1, no padding)."""
    cache = kwargs.get("past_key_values")
    hidden = kwargs.get("hidden_states")
    if not isinstance(cache, PressCache) or hidden is None or hidden.shape[1] == 1:
        return args, kwargs
    kept = cache.kept(module.layer_idx)
    if kept == 0:
        return args, kwargs
    q = hidden.shape[1]
    mask = torch.ones(q, kept + q, dtype=torch.bool, device=hidden.device)
    mask[:, kept:] = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()
    kwargs["attention_mask"] = mask.expand(hidden.shape[0], 1, q, kept + q)
    return args, kwargs


class _GivenTokenizer:
    """Stands in for ``AutoTokenizer`` in kvpress's KVzip module: its context loads the tokenizer
    from ``model.config.name_or_path`` on every prefill, which for a GGUF model is a folder without
    one; the loaded tokenizer is handed over instead."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer


def _context_hooks(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Model hooks that run the prefill of a fresh ``PressCache`` inside its press's own context,
    for a press that must wrap the prefill (:func:`wraps_prefill`): entered before the model's
    forward, left after it (KVzip then runs its reconstruction passes on the same cache). The
    forward that fills an empty cache is the prompt's (``--question in-prompt``) or the context's
    (``after-context``), so only that is what the press scores. The passes' tokens are appended
    and cut off again by the press; ``seen`` is restored to the prompt's count."""
    import importlib
    from unittest import mock

    def enter(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PressCache) and cache.press is not None and cache.seen == 0 and wraps_prefill(cache.press):
            context = cache.press(model)
            press_module = importlib.import_module(type(cache.press).__module__)
            with mock.patch.object(press_module, "AutoTokenizer", _GivenTokenizer(tokenizer), create=True):
                context.__enter__()
            cache.context = context
        return args, kwargs

    def leave(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        context = getattr(cache, "context", None)
        if context is not None:
            cache.context = None
            seen = cache.seen
            context.__exit__(None, None, None)
            cache.seen = seen
        return output

    return enter, leave


def attach_presses(model: Any, tokenizer: Any) -> list[Any]:
    """Install the dispatching hooks once (what ``press(model)`` does per press); returns handles."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    enter, leave = _context_hooks(model, tokenizer)
    handles = [model.register_forward_pre_hook(enter, with_kwargs=True),
               model.register_forward_hook(leave, with_kwargs=True)]
    for layer in lm.layers:
        layer.self_attn.rotary_emb = lm.rotary_emb
        handles.append(layer.self_attn.register_forward_hook(_press_hook, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(_mask_hook, with_kwargs=True))
    return handles


def attention_modules(model: Any) -> list[Any]:
    """Each layer's attention module: where kvpress's masking presses (KVzip) leave their masks."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in lm.layers]


def make_press(name: str, ratio: float, settings: dict[str, Any] | None = None) -> Any:
    return getattr(import_kvpress(), PRESSES[name])(compression_ratio=ratio, **(settings or {}))


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["snapkv:window_size=32,kernel_size=5"]`` -> ``{"snapkv": {"window_size": 32, "kernel_size": 5}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, body = item.partition(":")
        if not body:
            raise ValueError(f"expected NAME:key=value[,key=value], got {item!r}")
        for pair in body.split(","):
            key, _, raw = pair.partition("=")
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            out.setdefault(name, {})[key.strip()] = value
    return out


@dataclass
class PressSpec(PolicySpec):
    """A kvpress press at one ratio, run by ``run_compare`` like a kvpolicy policy."""

    press: Any = None
    model: Any = None
    #: ``QuantizedCache`` settings (``--press-cache quanto4``), or None: a ``DynamicCache``
    quantized: dict[str, Any] | None = None

    def new_cache(self) -> PressCache | QuantizedPressCache:
        """A fresh cache for the next sequence. The masks a press put on the attention modules
        (KVzip) belong to the last sequence: cleared here (kvpress clears them on a prefill)."""
        modules = attention_modules(self.model) if self.model is not None else []
        for module in modules:
            if getattr(module, "masked_key_indices", None) is not None:
                module.masked_key_indices = None
        if self.quantized is not None:
            make = functools.partial(QuantizedPressCache, backend="quanto", config=self.model.config, **self.quantized)
        else:
            make = PressCache
        if self.press is None:
            return make()
        self.press.post_init_from_model(self.model)
        return make(self.press, modules if wraps_prefill(self.press) else None)


def press_settings(press: Any) -> dict[str, Any]:
    return {f.name: getattr(press, f.name) for f in dataclasses.fields(press)
            if isinstance(getattr(press, f.name), (int, float, str, bool))}


@torch.no_grad()
def check_press(model: Any, tok: Any, name: str, ratio: float, settings: dict[str, Any] | None = None,
                follow: int = 8, quantized: dict[str, Any] | None = None) -> str | None:
    """Run one compressed prefill, a few decode steps and a forward of ``follow`` tokens on the
    compressed cache; the error text, or None if it works. ``follow``: a question's length where
    one follows the compressed context (KVzip's key masking fails on a forward whose queries no
    half-space holds)."""
    ids = tok("It is a truth universally acknowledged. " * 40, return_tensors="pt")["input_ids"][:, :200]
    ids = ids.to(model.device)
    try:
        spec = PressSpec(PRESSES[name], {}, ratio, press=make_press(name, ratio, settings), model=model,
                         quantized=quantized)
        cache = spec.new_cache()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3,
                       do_sample=False, pad_token_id=tok.pad_token_id or 0)
        model(input_ids=ids[:, :follow], past_key_values=cache, use_cache=True)
        if sum(cache.kv_tokens_per_layer()) >= cache.seen * len(cache.layers):
            return "the press removed nothing"
    except Exception as err:  # noqa: BLE001 - any failure means: skip this press, say why
        return f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return None


# --------------------------------------------------------------------------- specs
def kvpolicy_specs(
    names: list[str], ratios: list[float], settings: dict[str, dict[str, Any]] | None = None,
    kv_dtypes: tuple[str, ...] = ("auto",),
) -> list[PolicySpec]:
    """``full`` first, then each policy at each ratio (validated by ``build_specs``); ``settings``
    (per policy name) are added to the matching specs and checked by building one policy each."""
    from kvpolicy.core.registry import make_policy

    settings = settings or {}
    plain = [n for n in names if n not in VARIANTS]
    specs = build_specs(plain, ratios, kv_dtypes=kv_dtypes)
    for n in names:
        if n in VARIANTS:
            policy, extra = VARIANTS[n]
            specs += [_Variant(policy, {**extra, "compression_ratio": r}, r, variant=n) for r in ratios]
    for spec in specs:
        extra = settings.get(method_of(spec))
        if extra and spec.policy != "full":
            spec.settings = {**spec.settings, **extra}
            make_policy({"policy": spec.policy, **spec.settings})
    return specs


@dataclass
class _Variant(PolicySpec):
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.variant}@{self.ratio:g}"


def library_of(spec: PolicySpec) -> str:
    return "kvpress" if isinstance(spec, PressSpec) else "kvpolicy"


def method_of(spec: PolicySpec) -> str:
    if isinstance(spec, PressSpec):
        return spec.policy
    return spec.variant if isinstance(spec, _Variant) else spec.policy


# --------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{x:.0%}"


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith("ppl"):
        return f"{value:.3f}"
    if key.startswith("kv_reduction"):
        return f"{value:.1%}"
    return _pct(value)


def results_table(rows: list[dict[str, Any]], task_names: list[str]) -> str:
    keys = [k for n in task_names for k in task_mod.TASKS[n].columns(rows)]
    head = ["library", "method", "ratio", "KV reduction", "KV red. (prefill)", "prefill s"] + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["library"], r["method"], "-" if r["ratio"] is None else f"{r['ratio']:g}",
                 _fmt("kv_reduction", r["kv_reduction"]), _fmt("kv_reduction", r["kv_reduction_prefill"]),
                 f"{r['prefill_s']:.2f}"] + [_fmt(k, r.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_tables(rows: list[dict[str, Any]], task_names: list[str]) -> str:
    """Per metric: method x ratio, cells ``kvpolicy / kvpress`` for the matched pairs."""
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    by = {(r["library"], r["method"], r["ratio"]): r for r in rows}
    keys = ["kv_reduction"] + [task_mod.TASKS[n].headline for n in task_names]
    notes = {"kv_reduction": "measured KV reduction at the end of each sequence",
             "ppl_ratio": "ppl_ratio, lower is better", "needle_accuracy": "needle_accuracy, higher is better",
             "agreement": "agreement with full's greedy tokens, higher is better",
             "ruler_score": "ruler_score (mean over the RULER tasks), higher is better"}
    out = []
    for key in keys:
        lines = [f"**{notes.get(key, key)}** (kvpolicy / kvpress)", "",
                 "| method | " + " | ".join(f"{x:g}" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for ours, theirs in PAIRS.items():
            cells = []
            for x in ratios:
                a, b = by.get(("kvpolicy", ours, x)), by.get(("kvpress", theirs, x))
                if a is None or b is None:
                    cells.append("-")
                else:
                    cells.append(f"{_fmt(key, a.get(key))} / {_fmt(key, b.get(key))}")
            lines.append(f"| {ours} / {theirs} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def markdown_report(data: dict[str, Any]) -> str:
    env, task_names = data["environment"], data["tasks"]
    parts = [
        "# kvpolicy vs kvpress (generated by benchmarks/kvpress_compare.py)",
        f"Command: `{env['command']}`",
        f"kvpolicy {env['kvpolicy']}, kvpress {env['kvpress']}, transformers {env['transformers']}, "
        f"torch {env['torch']}, "
        f"Python {env['python']}; {env['cpu']} ({env['cpus']} CPUs, torch threads {env['torch_threads']}); "
        f"sizes `{data['sizes']}`; wall time {data['wall_s']:.0f} s.",
        *([_commit_line(data["meta"])] if data.get("meta") else []),
        *(["**Partial**: a run ended (or was stopped) before all its rows; below are the rows it finished."]
          if data.get("partial") else []),
        "## Pivot: matched pairs", pivot_tables(data["rows"], task_names),
        "## All rows", results_table(data["rows"], task_names),
        *(_ruler_parts(data) if "ruler" in task_names else []),
    ]
    if data.get("skipped"):
        parts.append("Skipped presses: " + "; ".join(f"`{k}`: {v}" for k, v in data["skipped"].items()))
    return "\n\n".join(parts) + "\n"


def _ruler_parts(data: dict[str, Any]) -> list[str]:
    """The suite's own tables (``kvpolicy.evaluation.ruler.report``): where the question was, the
    full cache's cells, the score per method and ratio, and each method per task at each ratio."""
    from kvpolicy.evaluation.ruler import report as ruler_report

    question = data.get("size_values", {}).get("question", "in_prompt")
    return [f"## RULER suite (question {question.replace('_', '-')})", ruler_report.markdown(data["rows"]).strip()]


def _commit_line(meta: dict[str, Any]) -> str:
    commit = meta.get("commit")
    if commit is None:
        return "Commit: unknown (not run from a git checkout)."
    dirty = " with uncommitted changes" if meta.get("dirty") else ""
    return f"Commit `{commit[:12]}`" + dirty + f", {meta.get('date')}."


def results_data(args: argparse.Namespace, argv: list[str], rows: list[dict[str, Any]], skipped: dict[str, str],
                 wall_s: float) -> dict[str, Any]:
    """The JSON file's content; ``argv``: the full command line, program first."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        kvpress_version = version("kvpress")
    except PackageNotFoundError:
        kvpress_version = None
    command = ((f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else "")
               + shlex.join(["python", *argv]))
    env = environment()
    env.update({
        "kvpress": kvpress_version,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    })
    meta = run_meta(argv, command=command, tool="benchmarks/kvpress_compare.py")
    sizes = args.eval_sizes or task_mod.PRESETS[args.sizes]
    return {"meta": meta, "environment": env, "sizes": args.sizes, "suite": args.suite,
            "size_values": dataclasses.asdict(sizes), "tasks": args.task_list,
            "ratios": args.ratio_list, "wall_s": wall_s, "skipped": skipped, "rows": rows}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- merge
#: the sizes that, with its task, length and index, decide a ruler sample: runs that agree on them
#: share their samples, whatever tasks, lengths or sample counts each ran (kvpolicy.evaluation.ruler.suite);
#: with the value a file written before the key existed stands for (``texts``: only the novels were read then)
SAMPLE_KEYS = {"seed": None, "question": None, "ruler_haystack": None, "texts": "austen"}


def inputs_of(data: dict[str, Any]) -> Any:
    """What two runs must share for their rows to be on the same inputs: the ruler suite's
    :data:`SAMPLE_KEYS` (so runs split by press, ratio, task or length merge), else every size."""
    sizes = data.get("size_values", {})
    if "ruler" in data["tasks"]:
        return {key: sizes.get(key, before) for key, before in SAMPLE_KEYS.items()}
    return sizes


def merge_results(datas: list[dict[str, Any]], argv: list[str]) -> dict[str, Any]:
    """Several runs' JSON as one (e.g. one process per press, each with its own ``full`` row): the
    ruler suite's rows pool their samples by label and every score is recomputed against ``full``
    (``kvpolicy.evaluation.ruler.report.merge_runs``); other tasks' rows are merged by label, the
    first run's ``full`` kept (``kvpolicy.evaluation.report.merge_runs``, which refuses runs whose
    ``full`` perplexities differ). The runs must share their tasks and inputs (:func:`inputs_of`),
    or their rows would not be on the same samples."""
    from kvpolicy.evaluation import report
    from kvpolicy.evaluation.ruler import report as ruler_report

    first = datas[0]
    for data in datas[1:]:
        if data["tasks"] != first["tasks"] or inputs_of(data) != inputs_of(first):
            raise ValueError(f"the runs differ in their tasks or inputs: {first['tasks']} {inputs_of(first)} vs "
                             f"{data['tasks']} {inputs_of(data)}; merge only runs on the same samples")
    runs = [data["rows"] for data in datas]
    rows = ruler_report.merge_runs(runs) if "ruler" in first["tasks"] else report.merge_runs(runs)
    skipped = {name: why for data in datas for name, why in data.get("skipped", {}).items()}
    command = shlex.join(["python", *argv])
    merged = [{"file": data.get("_file"), "meta": data.get("meta")} for data in datas]
    sizes = dict(first.get("size_values", {}))
    if "ruler" in first["tasks"]:  # what the pooled rows cover
        sizes["ruler_lengths"] = sorted({n for d in datas for n in d["size_values"]["ruler_lengths"]})
        sizes["ruler_tasks"] = list(dict.fromkeys(t for d in datas for t in d["size_values"]["ruler_tasks"]))
    return {**{k: v for k, v in first.items() if k != "_file"},
            "meta": run_meta(argv, command=command, tool="benchmarks/kvpress_compare.py --merge", merged=merged),
            "environment": {**first["environment"], "command": command}, "size_values": sizes,
            "ratios": sorted({r for data in datas for r in data.get("ratios", [])}),
            "wall_s": max(data["wall_s"] for data in datas), "skipped": skipped, "rows": rows,
            "partial": any(data.get("partial", False) for data in datas)}


def load_runs(paths: list[str]) -> list[dict[str, Any]]:
    datas = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        data["_file"] = Path(path).name
        datas.append(data)
    return datas


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from kvpolicy import cli

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--kvpolicy", default=None,
                    help="kvpolicy policies (full always runs first; '' runs full alone); "
                         f"default {DEFAULTS['tasks'][0]}, with --suite ruler {DEFAULTS['ruler'][0]}; "
                         "streamingllm_prefill = streamingllm with compress=prefill")
    ap.add_argument("--presses", default=None,
                    help=f"kvpress presses, from {','.join(PRESSES)} ('' runs none); default {DEFAULTS['tasks'][1]}, "
                         f"with --suite ruler {DEFAULTS['ruler'][1]}")
    ap.add_argument("--ratios", default=None,
                    help=f"default 0.2,0.4,0.6,0.8; with --suite ruler {cli.SUITES['ruler'][1]}")
    ap.add_argument("--tasks", default=None, help=f"ppl, needle, agreement (default: {cli.DEFAULT_TASKS})")
    ap.add_argument("--sizes", default="sweep", choices=sorted(task_mod.PRESETS))
    cli.add_input_arguments(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--policy-settings", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                    help="non-default kvpolicy settings, e.g. snapkv:window_size=64,kernel_size=5 (repeatable)")
    ap.add_argument("--press-settings", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                    help="non-default press settings, e.g. snapkv:window_size=32 (repeatable)")
    ap.add_argument("--kv-dtype", default="auto",
                    help="kvpolicy's kv_dtype for its policies, comma-separated to run each at each (as kvpolicy "
                         "compare --kv-dtype; full at auto stays the reference)")
    ap.add_argument("--press-cache", default="dynamic", choices=["dynamic", "quanto4"],
                    help="the cache the presses run on: dynamic (DynamicCache) or quanto4 (transformers' "
                         "QuantizedCache, optimum-quanto, nbits=4, its default groups of 64 and residual of 128; "
                         "pip install optimum-quanto); the no-press row runs on it too")
    ap.add_argument("--no-press-baseline", action="store_true",
                    help="leave out kvpress's row without a press (DynamicCache), e.g. in all but one of several "
                         "processes whose files are merged")
    ap.add_argument("--merge", nargs="+", metavar="FILE.json",
                    help="instead of running: merge these runs' --json files (e.g. one process per press) into "
                         "--json and --out")
    ap.add_argument("--json", help="write meta, environment, sizes and rows here")
    ap.add_argument("--out", help="write the markdown tables here")
    args = ap.parse_args(argv)
    kind = "ruler" if args.suite else "tasks"
    args.kvpolicy = DEFAULTS[kind][0] if args.kvpolicy is None else args.kvpolicy
    args.presses = DEFAULTS[kind][1] if args.presses is None else args.presses
    args.ratios = args.ratios or (cli.SUITES[args.suite][1] if args.suite else "0.2,0.4,0.6,0.8")
    args.ratio_list = [float(r) for r in args.ratios.split(",") if r]
    args.policy_list = [p for p in args.kvpolicy.split(",") if p]
    args.press_list = [p for p in args.presses.split(",") if p]
    args.eval_sizes = None  # built by input_sizes(args), which reads the novels or the haystack file
    try:
        args.task_list = cli.tasks_of(args)
    except cli.UsageError as err:
        ap.error(str(err))
    for t in args.task_list:
        if t not in task_mod.TASKS:
            ap.error(f"unknown task {t!r}; choose from {','.join(task_mod.TASKS)}")
    for p in args.press_list:
        if p not in PRESSES:
            ap.error(f"unknown press {p!r}; choose from {','.join(PRESSES)}")
    try:
        args.policy_settings_map = parse_settings(args.policy_settings)
        args.press_settings_map = parse_settings(args.press_settings)
    except ValueError as err:
        ap.error(str(err))
    if "observed_attention" in args.press_list:
        ap.error("observed_attention needs attention weights (eager attention for the whole model), "
                 "which would change the reference of every row; not supported here")
    if args.press_list and (args.batch_size or task_mod.PRESETS[args.sizes].batch_size) != 1:
        ap.error("presses run at batch size 1 (kvpress's compression assumes no padding); batch kvpolicy's "
                 "policies in a run without presses (--presses '')")
    return args


def input_sizes(args: argparse.Namespace) -> task_mod.EvalSizes:
    """The run's sizes, built as ``kvpolicy compare`` builds them from the same flags
    (``kvpolicy.cli.build_sizes``), so the ruler suite's samples are the ones it would run."""
    from kvpolicy import cli
    from kvpolicy.core.errors import KVPolicyError

    try:
        cli.check_device(args.device)
        return cli.build_sizes(args, args.task_list)
    except (cli.UsageError, KVPolicyError) as err:
        raise SystemExit(f"kvpress_compare: error: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    full_argv = sys.argv if argv is None else ["benchmarks/kvpress_compare.py", *argv]
    if args.merge:
        return finish(args, merge_results(load_runs(args.merge), full_argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from kvpolicy.models import load_model

    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    args.eval_sizes = input_sizes(args)
    specs = kvpolicy_specs(args.policy_list, args.ratio_list, args.policy_settings_map,
                           tuple(d for d in args.kv_dtype.split(",") if d))
    quantized = {"nbits": 4} if args.press_cache == "quanto4" else None
    cache_name = "QuantizedCache" if quantized else "DynamicCache"
    press_dtype = "quanto-int4" if quantized else "auto"
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    import_kvpress()  # after kvpolicy's attention wrapper: see import_kvpress
    attach_presses(model, tok)
    skipped: dict[str, str] = {}
    for name in args.press_list:
        follow = QUESTION_TOKENS if args.eval_sizes.question == "after_context" else 8
        err = check_press(model, tok, name, max(args.ratio_list), args.press_settings_map.get(name), follow,
                          quantized)
        if err:
            skipped[name] = err
            log(f"skipping press {name}: {err}")
    if not args.no_press_baseline:
        specs.append(PressSpec(cache_name, {}, None, kv_dtype=press_dtype, press=None, model=model,
                               quantized=quantized))  # kvpress's cache without a press
    for ratio in args.ratio_list:
        for name in args.press_list:
            if name not in skipped:
                press = make_press(name, ratio, args.press_settings_map.get(name))
                specs.append(PressSpec(PRESSES[name], press_settings(press), ratio, kv_dtype=press_dtype, press=press,
                                       model=model, quantized=quantized))
    total = len(specs) * len(args.task_list)
    step = [0]

    def progress(desc: str) -> None:
        step[0] += 1
        log(f"[{step[0]}/{total}] {desc}")

    def save_partial(done: list[dict[str, Any]]) -> None:
        if args.json:  # ``done``: copies of the finished rows, their KV reductions included
            data = results_data(args, full_argv, label_rows(specs, done), skipped, time.time() - start)
            Path(args.json).write_text(json.dumps({**data, "partial": True}, indent=1) + "\n")

    rows = run_compare(model, tok, specs, args.task_list, args.eval_sizes, progress=progress, on_row=save_partial)
    wall = time.time() - start
    log(f"done in {wall:.0f}s")
    return finish(args, results_data(args, full_argv, label_rows(specs, rows), skipped, wall))


def label_rows(specs: list[PolicySpec], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's library, method and label (``kvpolicy:snapkv@0.5``, ``kvpress:SnapKVPress@0.5``)."""
    for spec, row in zip(specs, rows):
        row["library"] = library_of(spec)
        row["method"] = method_of(spec)
        row["label"] = f"{row['library']}:{spec.label}"
    return rows


def finish(args: argparse.Namespace, data: dict[str, Any]) -> int:
    """Write the JSON (``--json``) and the Markdown report (printed, and to ``--out``)."""
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    report = markdown_report(data)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
