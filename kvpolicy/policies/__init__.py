"""Built-in policies, registered through the ``kvpolicy.policies`` entry point like any plugin."""

from __future__ import annotations

from ..core.registry import hookimpl
from .attention_scored import H2OPolicy, PyramidKVPolicy, SnapKVPolicy
from .budget import BudgetConfig, BudgetPolicy
from .expected_attention import ExpectedAttentionConfig, ExpectedAttentionPolicy
from .knorm import KnormConfig, KnormPolicy
from .kvzip import KVzipConfig, KVzipPolicy, kvzip_prompt_ids
from .pyramidinfer import PyramidInferConfig, PyramidInferPolicy
from .simple import FullPolicy, RandomPolicy, StreamingLLMPolicy
from .tova import TOVAConfig, TOVAPolicy

BUILTIN_POLICIES = [
    FullPolicy,
    PyramidInferPolicy,
    H2OPolicy,
    StreamingLLMPolicy,
    SnapKVPolicy,
    PyramidKVPolicy,
    RandomPolicy,
    TOVAPolicy,
    KnormPolicy,
    ExpectedAttentionPolicy,
    KVzipPolicy,
]


@hookimpl
def kvpolicy_policies():
    return list(BUILTIN_POLICIES)


__all__ = [
    "BUILTIN_POLICIES",
    "BudgetConfig",
    "BudgetPolicy",
    "ExpectedAttentionConfig",
    "ExpectedAttentionPolicy",
    "FullPolicy",
    "H2OPolicy",
    "KnormConfig",
    "KnormPolicy",
    "KVzipConfig",
    "KVzipPolicy",
    "PyramidInferConfig",
    "PyramidInferPolicy",
    "PyramidKVPolicy",
    "RandomPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "TOVAConfig",
    "TOVAPolicy",
    "kvpolicy_policies",
    "kvzip_prompt_ids",
]
