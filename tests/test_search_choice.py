"""Which trial the search keeps (pipeline/edit/search_choice.py): finalists and the choice rule."""

from __future__ import annotations

from pipeline.edit.search_choice import Scored, choose, clearly_cheaper, finalists_of, weaker


def _s(number: int, refusal: float, kl: float) -> Scored:
    return Scored(number, refusal, kl, {}, {})


def test_nothing_weaker_than_the_plain_edit_replaces_it():
    # Refusal likelihoods as on the demo: trial 1 refused fewer of the prompts seen at a lower KL, but starts the
    # base's refusals more readily than the plain edit (it refused 7 of the 40 test prompts to the plain edit's 3).
    plain = Scored(0, 0.05, 0.0057, {}, {}, likelihood=0.4508)
    weak = Scored(1, 0.025, 0.0032, {}, {}, likelihood=0.4836)
    twin = Scored(2, 0.05, 0.0050, {}, {}, likelihood=0.4500)
    best, rule = choose([plain, weak], base_rate=1.0, target=0.1, default=plain, slack=0.025)
    assert best.number == 0 and "none weaker than the plain edit" in rule
    best, _ = choose([plain, weak, twin], base_rate=1.0, target=0.1, default=plain, slack=0.025)
    assert best.number == 2  # as strong as the plain edit, at a lower KL
    best, _ = choose([plain, weak], base_rate=1.0, target=0.01, default=plain)
    assert best.number == 0  # outside the target the lowest refusal wins, but not a weaker edit's
    best, _ = choose([plain, weak], base_rate=1.0, target=0.1)
    assert best.number == 1  # without the plain edit there is nothing to be weaker than
    assert not weaker(weak, None) and not weaker(plain, plain) and weaker(weak, plain)


def test_finalists_include_the_plain_edits_lowest_kl_peers():
    # Trial-part scores as on Qwen2.5 (16 prompts): at the plain edit's count, trial 3's lower KL hides
    # trials 1 and 4 from the front, though the count is too small to tell them apart.
    plain = _s(0, 0.062, 0.043)
    trials = [plain, _s(1, 0.062, 0.040), _s(2, 0.062, 0.042), _s(3, 0.062, 0.033), _s(4, 0.062, 0.037),
              _s(5, 0.125, 0.020), _s(6, 0.25, 0.016), _s(7, 0.5, 0.002)]
    front = [trials[i] for i in (3, 5, 6, 7)]
    picks = finalists_of(front, trials, plain, limit=0.066, n=2)
    assert [t.number for t in picks] == [3, 5, 4, 1, 0]  # two of the front, two peers, then the plain edit
    assert [t.number for t in finalists_of(front, trials, None, limit=0.066, n=2)] == [3, 5]
    assert len({t.number for t in finalists_of(front, trials, plain, 0.066, n=8)}) == len(trials)


def _with_kls(number: int, kls: list[float]) -> Scored:
    return Scored(number, 0.05, sum(kls) / len(kls), {}, {}, likelihood=0.45, kl_prompts=tuple(kls))


def test_only_a_kl_lower_beyond_the_per_prompt_noise_replaces_the_plain_edit():
    base = [0.03 + 0.06 * ((7 * i) % 32) / 31 for i in range(32)]  # per-prompt KLs vary 3-fold, as on Qwen2.5
    plain = _with_kls(0, base)
    # 1% lower on average, but 0.02 up or down on each prompt; and 10% lower on every prompt
    noisy = _with_kls(1, [k - (0.0206 if i % 2 else -0.0194) for i, k in enumerate(base)])
    steady = _with_kls(2, [k * 0.9 for k in base])
    assert noisy.kl < plain.kl and steady.kl < noisy.kl
    assert not clearly_cheaper(noisy, plain) and clearly_cheaper(steady, plain)
    best, rule = choose([plain, noisy], base_rate=1.0, target=0.1, default=plain)
    assert best.number == 0 and "within the per-prompt noise" in rule
    best, rule = choose([plain, noisy, steady], base_rate=1.0, target=0.1, default=plain)
    assert best.number == 2
    assert clearly_cheaper(noisy, None) and clearly_cheaper(plain, plain)  # nothing to compare with
    assert clearly_cheaper(_s(3, 0.05, 0.001), plain) and not clearly_cheaper(_s(4, 0.05, 0.9), plain)  # means


def test_a_plain_edit_one_prompt_above_the_target_is_not_traded_for_a_stronger_costlier_edit():
    # Scores on the 32 prompts seen, as on Qwen2.5: target 6.6%, the plain edit refuses 3 (9.4%), one prompt above.
    kls = [0.02 + 0.04 * ((5 * i) % 32) / 31 for i in range(32)]

    def trial(number: int, refused: int, scale: float) -> Scored:
        return Scored(number, refused / 32, sum(kls) * scale / 32, {}, {}, likelihood=0.52,
                      kl_prompts=tuple(k * scale for k in kls))

    plain, stronger, cheaper, loose = trial(0, 3, 1.0), trial(1, 2, 1.1), trial(2, 3, 0.9), trial(3, 4, 0.8)
    kw = {"base_rate": 0.656, "target": 0.1, "slack": 1 / 32}
    best, rule = choose([plain, stronger], default=plain, **kw)
    assert best.number == 0 and "within one prompt of the target 6.6%" in rule
    best, _ = choose([plain, stronger, cheaper, loose], default=plain, **kw)
    assert best.number == 2  # as many refusals, clearly less KL; trial 3 refuses more than the plain edit
    best, _ = choose([plain, stronger], default=plain, **(kw | {"slack": 0.0}))
    assert best.number == 1  # without the count's noise to allow for, the target is reached by the stronger edit
    best, _ = choose([trial(0, 4, 1.0), stronger], default=trial(0, 4, 1.0), **kw)
    assert best.number == 1  # two prompts above the target: the plain edit does not hold the others back
