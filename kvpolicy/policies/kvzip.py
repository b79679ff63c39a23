"""KVzip (Kim et al., 2025): a KV pair matters as much as the model needs it to *reconstruct the context*.

Why it suits compress-once-ask-many: the score does not depend on any question. After the prompt's
forward, the model is run again over the prompt's cache on the prompt itself (optionally after an
instruction to repeat it), in chunks; each cached KV pair scores the largest attention any
reconstruction query pays it. Budgets are then shared across all layers and KV heads (or across the
heads of each layer, or kept uniform: ``allocation``). The pass costs about three more prompt forwards
on CPU (its forward, over twice the keys, and the scores' attention). See docs/policies/kvzip.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..core.config import PolicyConfig
from ..core.policy import CachePolicy, LayerView, Plan, ScoringChunk
from .targets import warn_if_missed

_QUERY_CHUNK = 512  # reconstruction queries scored at once: bounds the [B, H, G, chunk, K] logits


class KVzipConfig(PolicyConfig):
    """``compression_ratio``: share of the prompt's KV removed; ``budget`` instead: mean tokens kept per
    layer and head. ``allocation`` says where the kept tokens may go: ``"global"`` (kvpress's default) ranks
    all compressible layers' and KV heads' pairs together, so each layer and head keeps what the ranking
    gives it; ``"layer"`` (kvpress's ``layerwise=True``) gives every layer the same share, split across its
    heads; ``"uniform"`` gives every layer and head the same count (each head keeps its own best). Whichever,
    the bytes freed equal the tokens removed (each head is stored at its own length, ``core/layers/ragged.py``;
    inside a compiled decode step, as wide as the layer's fullest head). The
    ``sink_size`` first tokens (and ``window_size`` newest) are kept in every layer and head.

    The reconstruction input of chunk ``c`` is ``prompt_ids`` (``chunk_prompt_ids`` and the previous chunk's
    last ``overlap`` tokens after the first chunk), then ``suffix_ids``, then the chunk's ``chunk_size``
    prompt tokens. The reference's instruction and chat-template suffix are text, which the cache cannot
    tokenize: :func:`kvzip_prompt_ids` turns them into ids for a tokenizer. Left empty (the default), the
    prompt is simply repeated."""

    compression_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    budget: int | None = Field(None, ge=1)
    sink_size: int = Field(4, ge=0)
    window_size: int = Field(0, ge=0)
    allocation: Literal["global", "layer", "uniform"] = "global"
    chunk_size: int = Field(2048, ge=1)
    overlap: int = Field(8, ge=0)
    prompt_ids: tuple[int, ...] = ()
    chunk_prompt_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    pad_id: int = Field(0, ge=0, description="id written in the scoring chunks' padding (never attended)")


#: the reference's instructions (kvpress's KVzipPress, the KVzip repository)
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
REPEAT_PART_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def kvzip_prompt_ids(tokenizer) -> dict[str, tuple[int, ...]]:
    """``prompt_ids``, ``chunk_prompt_ids`` and ``suffix_ids`` for ``tokenizer``, as kvpress builds them: the
    reference's instructions, and what the tokenizer's chat template puts between a user message and the
    assistant's answer (``"\\n"`` without a template). Pass them to ``make_cache("kvzip", **ids)``."""
    if tokenizer.chat_template is None:
        suffix = "\n"
    else:
        dummy = "dummy context"
        separator = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                             add_generation_prompt=True, tokenize=False)
        suffix = text.split(separator)[1]

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    return {"prompt_ids": ids(REPEAT_PROMPT), "chunk_prompt_ids": ids(REPEAT_PART_PROMPT), "suffix_ids": ids(suffix)}


@dataclass
class KVzipLayerState:
    """One layer's scores from the scoring pass, ``[B, H_kv, T]`` over the prompt's columns (None before)."""

    scores: torch.Tensor | None = None

    def take_scores(self) -> torch.Tensor:
        scores, self.scores = self.scores, None
        return scores


class KVzipPolicy(CachePolicy):
    """Context-reconstruction scores, budgets shared across layers and heads; the prompt only."""

    name = "kvzip"
    config_class = KVzipConfig
    needs_scoring_pass = True

    def new_layer_state(self) -> KVzipLayerState:
        return KVzipLayerState()

    def plan(self, view: LayerView) -> Plan | None:
        return None  # nothing before the scoring pass (plan_scored), nothing while decoding

    # ------------------------------------------------------------------ the pass's inputs
    def scoring_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[ScoringChunk]:
        """One forward per ``chunk_size`` tokens of the longest row: each row's instruction, suffix and
        chunk, padded on the right (a row with nothing left in a chunk is all padding)."""
        c = self.config
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        longest = max(len(r) for r in rows)
        chunks = []
        for start in range(0, longest, c.chunk_size):
            lines, spans = [], []
            for tokens in rows:
                part = tokens[start : start + c.chunk_size]
                if start == 0:
                    lead = list(c.prompt_ids)
                else:  # the other instruction, then where the previous chunk ended
                    lead = list(c.chunk_prompt_ids) + tokens[max(0, start - c.overlap) : start]
                line = lead + list(c.suffix_ids) + part if part else []
                lines.append(line)
                # the reconstructed chunk: row-local positions [start, end), its tokens from column `offset` of the line
                spans.append((start, start + len(part), len(line) - len(part)))
            width = max(len(line) for line in lines)
            ids = torch.full((len(rows), width), c.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, line in enumerate(lines):
                ids[row, : len(line)] = torch.tensor(line, dtype=torch.long)
                mask[row, : len(line)] = 1
            chunks.append(ScoringChunk(ids.to(input_ids.device), mask.to(input_ids.device), {"spans": spans}))
        return chunks

    # ------------------------------------------------------------------ scoring
    def score(self, view: LayerView, query: torch.Tensor, chunk: ScoringChunk) -> None:
        """The chunk's queries' softmax over the sinks, the chunk being reconstructed and the chunk's own
        tokens (causal): the largest probability any query of a row and any query head of a group pays
        a prompt KV pair of the chunk is its score (``view.state.scores``, ``[B, H_kv, T]``)."""
        c = self.config
        q_len = view.new_tokens
        width = view.step - q_len  # the prompt's columns: slots [0, width) hold the prompt, then the chunk's
        keys = view.keys
        b, hkv, _, d = keys.shape
        hq = query.shape[1]
        g = hq // hkv
        spans = chunk.info["spans"]
        sinks = [min(c.sink_size, start) for start, _, _ in spans]
        longest = max(end - start for start, end, _ in spans)
        k_len = max(sinks) + longest + q_len
        # per row: the key slots of the softmax (sinks, chunk, the chunk forward's own) and whether each is real
        pad_host = view.layer.rows.pad_host
        index = torch.zeros(b, k_len, dtype=torch.long, device=keys.device)
        real = torch.zeros(b, k_len, dtype=torch.bool, device=keys.device)
        for row, ((start, end, _), s) in enumerate(zip(spans, sinks)):
            p = pad_host[row]
            slots = torch.cat([torch.arange(p, p + s), torch.arange(p + start, p + end),
                               torch.arange(width, width + q_len)])
            index[row, : len(slots)] = slots.to(keys.device)
            real[row, : len(slots)] = True
        # the chunk's own tokens causally (its right padding comes after every real query: never attended)
        own = index >= width
        gathered = keys.gather(2, index.view(b, 1, k_len, 1).expand(b, hkv, k_len, d)).float()
        queries = (query.float() * view.scaling).view(b, hkv, g, q_len, d)
        q_ok = chunk.attention_mask.to(keys.device).bool()  # [B, Q]
        q_slot = torch.arange(width, width + q_len, device=keys.device)
        scored = max(sinks) + longest  # the softmax's first keys: sinks and chunk (where scores are kept)
        best = torch.zeros(b, hkv, scored, device=keys.device)
        for s in range(0, q_len, _QUERY_CHUNK):
            qq = queries[:, :, :, s : s + _QUERY_CHUNK]
            causal = ~own.unsqueeze(1) | (index.unsqueeze(1) <= q_slot[s : s + _QUERY_CHUNK].view(1, -1, 1))  # [B,q,K]
            allowed = (real.unsqueeze(1) & causal).view(b, 1, 1, -1, k_len)
            logits = (qq @ gathered.unsqueeze(2).transpose(-1, -2)).masked_fill_(~allowed, float("-inf"))
            # every query may see its own key: no row is all -inf; a padding query's row is dropped below
            probs = torch.softmax(logits, dim=-1)[..., :scored]
            probs = probs * q_ok[:, s : s + _QUERY_CHUNK].view(b, 1, 1, -1, 1)
            best = torch.maximum(best, probs.amax(dim=(2, 3)))
        scores = view.state.scores
        if scores is None:
            scores = view.state.scores = torch.zeros(b, hkv, width, device=keys.device)
        for row, ((start, end, _), s) in enumerate(zip(spans, sinks)):
            cols = slice(pad_host[row] + start, pad_host[row] + end)
            scores[row, :, cols] = torch.maximum(scores[row, :, cols], best[row, :, s : s + end - start])

    # ------------------------------------------------------------------ budgets
    def _keep(self, n: int) -> int:
        c = self.config
        return min(c.budget, n) if c.budget is not None else n - int(n * c.compression_ratio)

    def plan_scored(self, views: list[LayerView]) -> list[Plan | None]:
        """Each row keeps ``keep(n)`` tokens per layer and head on average. ``"uniform"``: exactly that in each
        head, its best. ``"layer"``: per layer, one top-k over its heads (Ada-KV's split, no floor).
        ``"global"``: one top-k over every compressible layer's heads: each (layer, head) keeps what falls to
        it. Sinks and the window always stay."""
        c = self.config
        scores = [self._protected(v, v.state.take_scores()) for v in views]
        keep = [self._keep(n) for n in views[0].seen] if views else []
        if c.budget is None:  # a budget is met exactly; a ratio in whole tokens, which a short prompt may miss
            for n, k in sorted(set(zip(views[0].seen, keep))):
                if n > 0:
                    warn_if_missed(self.name, n, c.compression_ratio, 1.0 - k / n,
                                   f"each layer and head keeps {k} of {n} tokens on average, a whole number")
        if c.allocation != "global":
            share = 0.0 if c.allocation == "layer" else None
            return [Plan(keep=keep, scores=s, sinks=c.sink_size, recent=c.window_size, head_adaptive=share)
                    for s in scores]
        counts = self._global_counts(views, scores, keep)
        return [Plan(keep=n, scores=s, sinks=c.sink_size, recent=c.window_size) for n, s in zip(counts, scores)]

    @staticmethod
    def _global_counts(views: list[LayerView], scores: list[torch.Tensor], keep: list[int]) -> list[list[list[int]]]:
        """Each layer's kept count per row and KV head (``[layers][B][H_kv here]``) from one top-k over every
        layer's and head's scores. Under tensor parallelism the ranking needs every head: each layer's scores
        are gathered from the ranks (``view.gather_heads``), ranked as one process ranks them, and each rank
        takes its heads' counts."""
        whole = [v.gather_heads(s) for v, s in zip(views, scores)]
        b, hkv = whole[0].shape[:2]
        flat = torch.cat([s.reshape(b, -1) for s in whole], dim=1)  # [B, layers * H * T]
        total = [k * hkv * len(views) for k in keep]
        top = flat.topk(max(total), dim=1).indices
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen.scatter_(1, top, torch.arange(max(total), device=flat.device).view(1, -1)
                        < torch.tensor(total, device=flat.device).view(-1, 1))
        counts = chosen.view(b, len(views), hkv, -1).sum(-1).permute(1, 0, 2).tolist()  # [layers][B][H]
        first, local = views[0].head_offset, scores[0].shape[1]
        return [[row[first : first + local] for row in layer] for layer in counts]

    def _protected(self, view: LayerView, scores: torch.Tensor) -> torch.Tensor:
        """Scores with the sinks and the window at +inf (in every layer and head) and non-tokens at -inf, so
        a shared ranking gives them their places first and empty slots never."""
        c = self.config
        local = view.positions
        seen = torch.tensor(view.seen, device=local.device).view(-1, 1, 1)
        keep = torch.tensor([self._keep(n) for n in view.seen], device=local.device).view(-1, 1, 1)
        recent = torch.minimum(keep, torch.full_like(keep, c.window_size))
        sinks = torch.minimum(keep - recent, torch.full_like(keep, c.sink_size))
        protected = (local >= 0) & ((local < sinks) | (local >= seen - recent))
        scores = scores.masked_fill(protected, float("inf"))
        return scores.masked_fill(local < 0, float("-inf"))
