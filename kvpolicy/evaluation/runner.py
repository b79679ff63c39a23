"""Run policies over tasks and turn the measurements into one result row per policy.

Why it is built this way: quality and cost are only comparable on identical inputs, so the
tasks prepare their inputs once and every policy (``full`` first, as the reference for the
ratios and for agreement) runs them in the same order. Policies are validated before any
model work, so a typo fails in a second rather than after the first policy.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.cache import make_cache
from ..core.compat import cache_argument
from ..core.config import ConfigError, load_preset
from ..core.errors import UnknownPolicyError
from ..core.layers import choose_codec
from ..core.registry import available_policies, make_policy, policy_class
from .measure import Meter
from .tasks import TASKS, EvalSizes, Task

#: the policy every other one is measured against (always run first)
REFERENCE = "full"


@dataclass
class PolicySpec:
    """One policy to run: its name, the settings it is built with, and the sweep ratio."""

    policy: str
    settings: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    config: str | None = None
    #: the name it was asked for by, when not the policy's (a preset named in ``--policies``)
    name: str | None = None
    #: how the cache stores kept keys/values (``--kv-dtype``): ``auto`` is the model's dtype
    kv_dtype: str = "auto"

    @property
    def label(self) -> str:
        base = self.name or self.policy
        if self.kv_dtype != "auto":  # before the ratio: a plot draws h2o and h2o+int8 as two lines
            base = f"{base}+{self.kv_dtype}"
        return base if self.ratio is None else f"{base}@{self.ratio:g}"

    @property
    def is_reference(self) -> bool:
        """The row every other one is measured against: ``full`` at the model's dtype."""
        return self.policy == REFERENCE and self.ratio is None and self.kv_dtype == "auto"

    def new_cache(self) -> Any:
        return make_cache({"policy": self.policy, **self.settings}, kv_dtype=self.kv_dtype)


def takes_ratio(policy: str) -> bool:
    """Whether ``--ratio``/``--ratios`` set the policy's ``compression_ratio``: every policy that has one,
    PyramidInfer included (where it is opt-in, default None: a bare ``pyramidinfer`` at 0.5 would otherwise
    remove what its own schedule removes, 18% on SmolLM2, beside budget policies removing 50%). A preset
    (``--config``) that sets ``compression_ratio`` or ``budget`` itself, ``null`` included, keeps it."""
    return "compression_ratio" in policy_class(policy).config_class.model_fields


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"compression ratio {ratio:g} is outside [0, 1); pass e.g. --ratio 0.54")
    return ratio


def _named(name: str) -> tuple[str, dict[str, Any], bool]:
    """``(policy, settings, is_preset)`` of a name in ``--policies``: a registered policy, else a preset
    (``configs/<name>.yaml``); an unknown name raises the registry's error listing the policies."""
    try:
        policy_class(name)
        return name, {}, False
    except UnknownPolicyError:
        try:
            preset = dict(load_preset(name))
        except ConfigError:
            raise UnknownPolicyError(name, available_policies()) from None
    return preset.pop("policy"), preset, True


def build_specs(policies: list[str], ratios: list[float], config: str | None = None,
                kv_dtypes: tuple[str, ...] = ("auto",)) -> list[PolicySpec]:
    """One spec per policy, ratio and ``kv_dtypes`` entry (ratio-free policies once per dtype), ``full`` at the
    model's dtype first (the reference, also when ``kv_dtypes`` leaves ``auto`` out); all validated.

    ``config`` (a preset name or file) gives the settings of the policy it names; its own
    ``compression_ratio`` or ``budget``, if set, wins over ``ratios`` for that policy. A name
    ``policy@ratio`` runs that policy at that ``compression_ratio`` alone (e.g. ``pyramidinfer@0.5``,
    whose ratio is opt-in and so not swept). A preset's name (``pyramidinfer_54_floor``) runs the
    preset's settings at each ratio, as a budget policy does, unless the preset sets its own
    ``compression_ratio`` or ``budget`` (so ``pyramidinfer_54_floor`` is PyramidInfer with that
    preset's shape, scaled to remove what the others remove); ``preset@ratio`` at that ratio alone.
    """
    preset: dict[str, Any] = {}
    if config:
        preset = dict(load_preset(config))
    preset_policy = preset.pop("policy", None)
    for r in ratios:
        check_ratio(r)
    names = [REFERENCE] + [p for p in dict.fromkeys(policies) if p != REFERENCE]
    if preset_policy and preset_policy not in names:
        names.append(preset_policy)
    specs: list[PolicySpec] = []
    for name in names:
        if "@" in name:  # one policy (or preset) at one ratio
            base_name, _, ratio_text = name.partition("@")
            try:
                ratio = float(ratio_text)
            except ValueError:
                raise ConfigError(f"{name!r}: write a policy at a ratio as name@ratio, e.g. pyramidinfer@0.5") from None
            check_ratio(ratio)
            policy, settings, is_preset = _named(base_name)
            specs.append(PolicySpec(policy, {**settings, "compression_ratio": ratio}, ratio,
                                    base_name if is_preset else None, base_name if is_preset else None))
            continue
        policy, settings, is_preset = _named(name)
        if is_preset:
            fixed = "compression_ratio" in settings or "budget" in settings
            ratio_field = "compression_ratio" in policy_class(policy).config_class.model_fields
            if fixed or not ratio_field:
                specs.append(PolicySpec(policy, settings, settings.get("compression_ratio"), name, name))
            else:
                specs += [PolicySpec(policy, {**settings, "compression_ratio": r}, r, name, name) for r in ratios]
            continue
        base = dict(preset) if name == preset_policy else {}
        fixed = "compression_ratio" in base or "budget" in base
        if takes_ratio(name) and not fixed:
            for r in ratios:
                specs.append(PolicySpec(name, {**base, "compression_ratio": r}, r, config if base else None))
        else:
            specs.append(PolicySpec(name, base, base.get("compression_ratio"), config if base else None))
    for kv_dtype in kv_dtypes:
        choose_codec(kv_dtype)  # validated now
    specs = [specs[0]] + [dataclasses.replace(spec, kv_dtype=kv_dtype) for spec in specs for kv_dtype in kv_dtypes
                          if not (spec is specs[0] and kv_dtype == "auto")]
    for spec in specs:
        make_policy({"policy": spec.policy, **spec.settings})  # validate settings now
    return specs


def _row(spec: PolicySpec, meter: Meter, metrics: dict[str, float], peak_cuda: int | None) -> dict[str, Any]:
    seqs = meter.sequences
    prefill_s = sum(s.prefill_s for s in seqs)
    decode_s = sum(s.decode_s for s in seqs)
    first = seqs[-1] if seqs else None
    row: dict[str, Any] = {
        "policy": spec.policy,
        "label": spec.label,
        "ratio": spec.ratio,
        "kv_dtype": spec.kv_dtype,
        "config": spec.config,
        "settings": spec.settings,
        "sequences": len(seqs),
        "kv_bytes_prefill": int(statistics.mean(s.kv_bytes_prefill for s in seqs)) if seqs else 0,
        "kv_bytes": int(statistics.mean(s.kv_bytes_end for s in seqs)) if seqs else 0,
        "kv_bytes_allocated": int(statistics.mean(s.kv_bytes_allocated_end for s in seqs)) if seqs else 0,
        "peak_memory_bytes": peak_cuda if peak_cuda is not None else max((s.peak_cache_bytes for s in seqs), default=0),
        "peak_memory_source": "cuda_max_memory_allocated" if peak_cuda is not None else "kv_cache_peak",
        "prefill_s": prefill_s / len(seqs) if seqs else 0.0,
        "prefill_tokens_per_s": sum(s.prefill_tokens for s in seqs) / prefill_s if prefill_s else 0.0,
        "decode_tokens_per_s": sum(s.decode_tokens for s in seqs) / decode_s if decode_s else 0.0,
        "layer_tokens_prefill": first.layer_tokens_prefill if first else [],
        "layer_tokens_end": first.layer_tokens_end if first else [],
        "_kv_prefill_each": [s.kv_bytes_prefill for s in seqs],
        "_kv_end_each": [s.kv_bytes_end for s in seqs],
    }
    row.update(metrics)
    return row


def _add_reductions(rows: list[dict[str, Any]]) -> None:
    """``kv_reduction``: 1 - bytes / full's bytes on the same sequences (at the end and after prefill)."""
    ref = next((r for r in rows if r["policy"] == REFERENCE), None)
    for row in rows:
        for key, each in (("kv_reduction", "_kv_end_each"), ("kv_reduction_prefill", "_kv_prefill_each")):
            full = sum(ref[each]) if ref else 0
            row[key] = 1.0 - sum(row[each]) / full if full else 0.0
    for row in rows:
        row.pop("_kv_prefill_each")
        row.pop("_kv_end_each")


@torch.no_grad()
def _warm_up(model: Any, tokenizer: Any) -> None:
    """One short untimed generation: the first forwards pay one-off set-up costs (kernel
    selection, lazy imports) that would otherwise be charged to the first policy."""
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arg = cache_argument(model)
    model.generate(**ids, **{arg: make_cache(REFERENCE)}, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    model(input_ids=ids["input_ids"], use_cache=True, **{arg: make_cache(REFERENCE)})


def run_compare(
    model: Any,
    tokenizer: Any,
    specs: list[PolicySpec],
    task_names: list[str],
    sizes: EvalSizes,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every spec over every task; one row per spec (``full`` first).

    ``progress(description)`` is called before each (policy, task) step and ``on_step()`` after
    each unit of work (a step, or each batch of a task of several ``units``), so a caller can drive
    any progress bar; ``on_total(count)`` says how many units there are, once the inputs are ready.
    ``on_row(rows)`` gets the finished rows (complete, reductions included) after each spec, so a
    long run cut short keeps what it finished.
    """
    tasks: list[Task] = []
    for name in task_names:
        task = TASKS[name]()
        task.prepare(tokenizer, sizes)
        tasks.append(task)
    if on_total:
        on_total(len(specs) * sum(task.units for task in tasks))
    _warm_up(model, tokenizer)
    references: dict[str, Any] = {}
    details: dict[str, Any] = {}
    rows = []
    cuda = model.device.type == "cuda"
    for spec in specs:
        meter = Meter()
        metrics: dict[str, float] = {}
        extra: dict[str, Any] = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        for task in tasks:
            if progress:
                progress(f"{spec.label}: {task.name}")
            task.on_unit = on_step if task.units > 1 else None
            result = task.run(model, spec.new_cache, meter, references.get(task.name))
            if spec.is_reference:
                references.setdefault(task.name, result.reference)
            metrics.update(result.metrics)
            extra.update(result.extra)
            details[f"{spec.label}/{task.name}"] = result.details
            if on_step and task.units <= 1:
                on_step()
        peak = int(torch.cuda.max_memory_allocated(model.device)) if cuda else None
        rows.append({**_row(spec, meter, metrics, peak), **extra})
        if on_row:
            done = copy.deepcopy(rows)
            _add_reductions(done)
            on_row(done)
    _add_reductions(rows)
    return rows
