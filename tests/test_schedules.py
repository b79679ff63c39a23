"""Every per-layer schedule against counts worked out by hand, not by the code under test.

Each expected list is a literal; the comment above it shows the arithmetic (the reference
formulas of github.com/mutonix/pyramidinfer, models/modeling_llama_pyramidinfer.py, and of
PyramidKV). Cosines used below, to 5 places:
cos(pi/8) = 0.92388, cos(pi/4) = 0.70711, cos(3pi/8) = 0.38268, cos(pi/2) = 0.
A wrong rounding (int -> ceil/round), an off-by-one layer index, l/(L-1) for l/L, a '>' that
became '>=' or a dropped floor changes at least one literal here.
"""

import pytest

from kvpolicy import make_policy
from kvpolicy.policies.attention_scored import spread_surplus
from kvpolicy.policies.schedule import decay_ratio, linear_budgets, pyramid_context_lengths


# ----------------------------------------------------------------------------- decay_ratio
# r_l for final ratio r = 0.5 over L = 4 layers (reference: l / L, not l / (L - 1)):
#   cosine (1 - r) (cos(pi l / 4) + 1) / 2 + r = 0.25 (cos(pi l / 4) + 1) + 0.5
#     l=0: 0.25 * 2       + 0.5 = 1.0
#     l=1: 0.25 * 1.70711 + 0.5 = 0.926777
#     l=2: 0.25 * 1       + 0.5 = 0.75
#     l=3: 0.25 * 0.29289 + 0.5 = 0.573223
#   linear 1 - (1 - r) l / L = 1 - 0.125 l: 1, 0.875, 0.75, 0.625
#   constant: r at every layer, layer 0 included (the reference prunes after layer 0 then)
@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("cosine", [1.0, 0.926777, 0.75, 0.573223]),
        ("linear", [1.0, 0.875, 0.75, 0.625]),
        ("constant", [0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_decay_ratio_by_hand(strategy, expected):
    got = [decay_ratio(layer, 4, 0.5, strategy) for layer in range(4)]
    assert got == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- PyramidInfer prefill
# Reference: the context after layer l is int(C_l * r_l), taken only when l % interval == 0,
# C_l > min and the candidate itself is > min (else C_l is kept); layer 0 holds all of it.


def test_pyramid_context_lengths_cosine_by_hand():
    """The tiny-model configuration of test_policies.py: a 300-token prompt, recent window
    1 + int(300 * 0.2) = 61, so C_0 = 239; 8 layers, r = 0.9 cosine, min 16, every layer.

    r_l = 0.1 (cos(pi l / 8) + 1) / 2 + 0.9 = 0.9 + 0.05 (1 + cos(pi l / 8)):
      r_0 = 1 (no pruning), r_1 = 0.996194, r_2 = 0.985355, r_3 = 0.969134, r_4 = 0.95,
      r_5 = 0.930866, r_6 = 0.914645 (r_7 is never used: nothing follows the last layer)
    C_1 = 239 (r_0 = 1)
    C_2 = int(239 * 0.996194) = int(238.09) = 238
    C_3 = int(238 * 0.985355) = int(234.51) = 234
    C_4 = int(234 * 0.969134) = int(226.78) = 226
    C_5 = int(226 * 0.95)     = int(214.70) = 214
    C_6 = int(214 * 0.930866) = int(199.21) = 199
    C_7 = int(199 * 0.914645) = int(182.01) = 182
    """
    assert pyramid_context_lengths(239, 8, 0.9, "cosine", 16, 1) == [239, 239, 238, 234, 226, 214, 199, 182]


def test_pyramid_context_lengths_downsample_interval_by_hand():
    """13B-style: r = 0.8 cosine, prune after every 2nd layer only (l = 0, 2, 4, 6), C_0 = 500, min 64.

    r_l = 0.8 + 0.1 (1 + cos(pi l / 8)): r_0 = 1, r_2 = 0.970711, r_4 = 0.9, r_6 = 0.829289
    C_1 = 500 (r_0 = 1), C_2 = 500 (l = 1 skipped)
    C_3 = int(500 * 0.970711) = int(485.36) = 485, C_4 = 485 (skipped)
    C_5 = int(485 * 0.9)      = int(436.5)  = 436, C_6 = 436 (skipped)
    C_7 = int(436 * 0.829289) = int(361.57) = 361
    """
    assert pyramid_context_lengths(500, 8, 0.8, "cosine", 64, 2) == [500, 500, 500, 485, 485, 436, 436, 361]


def test_pyramid_context_lengths_min_context_by_hand():
    """Linear r = 0.2 over 6 layers, C_0 = 100, min 37: the floor stops pruning.

    r_l = 1 - 0.8 l / 6: r_1 = 0.866667, r_2 = 0.733333, r_3 = 0.6, r_4 = 0.466667
    C_1 = 100 (r_0 = 1)
    C_2 = int(100 * 0.866667) = int(86.67) = 86
    C_3 = int(86 * 0.733333)  = int(63.07) = 63
    C_4: int(63 * 0.6) = int(37.8) = 37, not > 37 -> stays 63
    C_5: int(63 * 0.466667) = 29, not > 37 -> stays 63
    """
    assert pyramid_context_lengths(100, 6, 0.2, "linear", 37, 1) == [100, 100, 86, 63, 63, 63]


def test_pyramid_context_lengths_constant_by_hand():
    """Constant r = 0.5 prunes after layer 0 too: C_0 = 200, 4 layers, min 30.

    C_1 = int(200 * 0.5) = 100, C_2 = int(100 * 0.5) = 50, C_3: int(50 * 0.5) = 25, not > 30 -> 50
    """
    assert pyramid_context_lengths(200, 4, 0.5, "constant", 30, 1) == [200, 100, 50, 50]


def test_floor_preset_context_budgets_by_hand():
    """``pyramidinfer_54_floor`` (recent 0.02, linear decay to 0.1, min 64, min_context_ratio 0.24) on
    8 layers and a 1010-token prompt: window 1 + int(1010 * 0.02) = 1 + int(20.2) = 21, C_0 = 989,
    floor max(64, int(0.24 * 989)) = max(64, int(237.36)) = 237.

    r_l = 1 - 0.9 l / 8 = 1 - 0.1125 l: r_1 = 0.8875, r_2 = 0.775, r_3 = 0.6625, r_4 = 0.55,
    r_5 = 0.4375, r_6 = 0.325
    C_2 = int(989 * 0.8875) = int(877.74) = 877
    C_3 = int(877 * 0.775)  = int(679.68) = 679
    C_4 = int(679 * 0.6625) = int(449.84) = 449
    C_5 = int(449 * 0.55)   = int(246.95) = 246
    C_6: int(246 * 0.4375) = int(107.63) = 107, not > 237 -> 246; C_7 likewise 246
    Without the ratio floor (min_context_ratio 0: floor 64) C_6 = 107 and C_7: int(107 * 0.325)
    = int(34.78) = 34, not > 64 -> 107.
    """
    policy = make_policy("pyramidinfer_54_floor")
    policy.setup(8, [True] * 8)
    assert policy.recent_window(1010, policy.config.prefill_recent_ratio) == 21
    assert policy.context_budgets(989) == [989, 989, 877, 679, 449, 246, 246, 246]
    reference_floor = make_policy("pyramidinfer_54_floor", min_context_ratio=0.0)
    reference_floor.setup(8, [True] * 8)
    assert reference_floor.context_budgets(989) == [989, 989, 877, 679, 449, 246, 107, 107]


# ----------------------------------------------------------------------------- PyramidInfer decoding
# Reference: a group of E tokens leaving the recent window keeps max(int(E * gen_compress_ratio * r_l), 1),
# r_l the cosine schedule with r = gen_decay_ratio = 0.1: r_l = 0.1 + 0.45 (1 + cos(pi l / L)).


def test_group_keep_reference_settings_by_hand():
    """Reference settings (E = 16, gen_compress_ratio 0.9, so 14.4 * r_l) on 8 layers:

    r_0 = 1        -> int(14.4)          = 14
    r_1 = 0.965746 -> int(14.4 * r_1)    = int(13.91) = 13
    r_2 = 0.868198 ->                      int(12.50) = 12
    r_3 = 0.722207 ->                      int(10.40) = 10
    r_4 = 0.55     ->                      int(7.92)  = 7
    r_5 = 0.377793 ->                      int(5.44)  = 5
    r_6 = 0.231802 ->                      int(3.34)  = 3
    r_7 = 0.134254 ->                      int(1.93)  = 1
    """
    policy = make_policy("pyramidinfer_llama2_7b")
    policy.setup(8, [True] * 8)
    assert [policy.group_keep(layer) for layer in range(8)] == [14, 13, 12, 10, 7, 5, 3, 1]


def test_group_keep_never_below_one_by_hand():
    """E = 4, gen_compress_ratio 0.5 (so 2 * r_l) on 4 layers, r_l = 0.1 + 0.45 (1 + cos(pi l / 4)):
    r = 1, 0.868198, 0.55, 0.231802 -> int(2), int(1.74), int(1.1), int(0.46) = 2, 1, 1, 0 -> max(0, 1) = 1.
    """
    policy = make_policy("pyramidinfer", exceed_length_to_compress=4, gen_compress_ratio=0.5)
    policy.setup(4, [True] * 4)
    assert [policy.group_keep(layer) for layer in range(4)] == [2, 1, 1, 1]


def test_pyramidinfer_decode_growth_by_hand():
    """Slots a layer grows by over 20 decode steps (what the static decode path allocates), for the
    decode test of test_policies.py: prompt 100, E = 8, 4 layers; group keeps 7, 6, 3, 1 (r_l above
    with 7.2 * r_l: int(7.2), int(6.25), int(3.96), int(1.67)), so a group evicts 1, 2, 5, 7.
    Decode window w_g = 1 + int(100 * 0.2) = 21 and the first group starts at 100 - 21 = 79, so a
    group is due when 100 + step - 21 - frontier >= 8: at step 8 (frontier 79 -> 87) and step 16.
    The count rises 1 a step and drops by the eviction at steps 8 and 16; the peak is taken before
    the drop:
      evict 1: 8 -> 7, 15 -> 14, then 18 at step 20  -> 18
      evict 2: 8 -> 6, 14 -> 12, then 16             -> 16
      evict 5: 8 -> 3, 11 -> 6,  then 10             -> 11
      evict 7: 8 -> 1, 9 -> 2,   then 6              -> 9
    """
    policy = make_policy("pyramidinfer", min_context_length=8, exceed_length_to_compress=8)
    policy.setup(4, [True] * 4)
    assert [policy.group_keep(layer) for layer in range(4)] == [7, 6, 3, 1]
    assert [policy.decode_growth(layer, [100], 20) for layer in range(4)] == [18, 16, 11, 9]


def test_budget_decode_growth_by_hand():
    """H2O at ratio 0.5 evicting every 4 steps, prompt 100, 10 steps: budget(n) = n - int(n / 2).
    Start at budget(100) = 50; steps 1-4 grow to 54, step 4 drops to budget(104) = 52; steps 5-8 grow
    to 56, step 8 drops to budget(108) = 54; steps 9-10 grow to 56. Peak 56, growth 56 - 50 = 6.
    """
    policy = make_policy("h2o", compression_ratio=0.5, evict_every=4)
    assert policy.decode_growth(0, [100], 10) == 6


# ----------------------------------------------------------------------------- PyramidKV


def test_linear_budgets_by_hand():
    """PyramidKV's arithmetic budgets: 6 layers, mean 100 (total 600), beta 20, floor 36.
    top = max(100 / 20, 36) = 36, bottom = 2 * 100 - 36 = 164, step (164 - 36) / 5 = 25.6:
    164, 138.4, 112.8, 87.2, 61.6, 36 -> rounded 164, 138, 113, 87, 62, 36 (sum 600)."""
    assert linear_budgets(600, 6, 20.0, 36) == [164, 138, 113, 87, 62, 36]


def test_linear_budgets_with_surplus_spread_by_hand():
    """A 150-token prompt at ratio 0.25 on 6 layers: mean 150 - int(37.5) = 113, total 678, floor 36.
    top = 36, bottom = 226 - 36 = 190, step (190 - 36) / 5 = 30.8:
    190, 159.2, 128.4, 97.6, 66.8, 36 -> 190, 159, 128, 98, 67, 36 (sum 678).
    A layer cannot keep more than the 150 tokens it saw: layers 0 and 1 are clipped to 150, surplus
    40 + 9 = 49 goes to the four open layers, 49 // 4 = 12 each (128 -> 140, 98 -> 110, 67 -> 79,
    36 -> 48; 1 left), then 1 to the first open layer (140 -> 141): 150, 150, 141, 110, 79, 48 (sum 678).
    """
    budgets = linear_budgets(678, 6, 20.0, 36)
    assert budgets == [190, 159, 128, 98, 67, 36]
    assert spread_surplus(budgets, 150) == [150, 150, 141, 110, 79, 48]
