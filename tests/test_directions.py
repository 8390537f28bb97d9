"""Direction maths, validation, layer resolution, files, and measurement on the demo model."""

from __future__ import annotations

import pytest
import torch

from pipeline.edit import directions as dirs
from pipeline.errors import UserError


def _fake(num_layers: int = 5, hidden: int = 8) -> dirs.Directions:
    g = torch.Generator().manual_seed(0)
    d = dirs.unit(torch.randn(num_layers, hidden, generator=g))
    stats = [dirs.LayerStats(i, 1.0, 2.0, 1.0, True) for i in range(num_layers)]
    return dirs.Directions(d, d.clone(), torch.randn(num_layers, hidden), torch.randn(num_layers, hidden), stats, 2, {})


def test_mean_difference_and_clipping():
    harmful = torch.zeros(2, 1000, dtype=torch.float64)
    harmless = torch.zeros(2, 1000, dtype=torch.float64)
    harmful[:, 0] = 100.0  # one outlier component
    harmful[:, 1:] = torch.linspace(0, 1, 999)
    diff = dirs.mean_difference(harmful, harmless, clip=True)
    assert diff[:, 0].max() < 2.0  # clipped at the 99.5th percentile
    assert torch.equal(dirs.mean_difference(harmful, harmless)[:, 0], harmful[:, 0])


def test_projected_direction_is_orthogonal_to_the_harmless_mean():
    g = torch.Generator().manual_seed(1)
    r = dirs.unit(torch.randn(3, 16, generator=g))
    m = torch.randn(3, 16, generator=g)
    p = dirs.project_out_harmless(r, m)
    assert torch.allclose(p.norm(dim=-1), torch.ones(3))
    assert ((p * m).sum(-1)).abs().max() < 1e-5


def test_separation_stats():
    h = torch.tensor([2.0, 2.2, 1.8, 2.1])
    b = torch.tensor([0.0, 0.1, -0.1, 0.05])
    sep, acc = dirs.separation_stats(h, b)
    assert sep > 10 and acc == 1.0
    sep, acc = dirs.separation_stats(b, b)
    assert sep == 0 and acc == 0.5


def test_resolve_layer_index_best_fraction_and_errors():
    d = _fake()
    v, info = dirs.resolve_layer("best", d)
    assert info["index"] == 2 and torch.equal(v, d.directions[2])
    v, info = dirs.resolve_layer("3", d)
    assert torch.equal(v, d.directions[3])
    v, info = dirs.resolve_layer("0.5", d)  # exactly layer 2 of 0..4
    assert torch.allclose(v, d.directions[2], atol=1e-6)
    v, info = dirs.resolve_layer("0.625", d)  # halfway between 2 and 3
    expected = dirs.unit(d.directions[2] + d.directions[3])
    assert torch.allclose(v, expected, atol=1e-6) and info["between"] == [2, 3]
    for bad in ("7", "1.5", "middle", "-9"):
        with pytest.raises(UserError):
            dirs.resolve_layer(bad, d)


def test_save_and_load_round_trip(tmp_path):
    d = _fake()
    dirs.save(d, tmp_path)
    assert (tmp_path / dirs.DIRECTIONS_PNG).stat().st_size > 1000
    back = dirs.load(tmp_path)
    assert torch.equal(back.directions, d.directions) and back.suggested_layer == 2
    assert back.stats[1] == d.stats[1]
    with pytest.raises(UserError):
        dirs.load(tmp_path / "missing")


def test_holdout_is_disjoint_and_spread():
    prompts = [f"p{i}" for i in range(20)]
    fit, val = dirs.holdout(prompts, 0.25)
    assert len(val) == 5 and not set(fit) & set(val) and set(fit) | set(val) == set(prompts)
    assert val[0] == "p0" and val[-1] == "p16"


def test_measurement_on_demo_finds_a_valid_behavioural_layer(demo_loaded, demo_prompts):
    cfg = dirs.DirectionsConfig(batch_size=32)
    d = dirs.measure(
        demo_loaded.model, demo_loaded.tokenizer, demo_prompts.harmful.measure, demo_prompts.harmless.measure, cfg
    )
    assert d.directions.shape == (6, 128)
    assert torch.allclose(d.directions.norm(dim=-1), torch.ones(6), atol=1e-5)
    # The demo refuses its harmful measurement phrasings and answers the harmless ones: all are kept.
    kept = d.info["filter"]
    assert kept["harmful"]["kept"] >= 0.9 * kept["harmful"]["of"]
    assert kept["harmless"]["kept"] >= 0.9 * kept["harmless"]["of"]
    chosen = d.stats[d.suggested_layer]
    assert d.suggested_layer in d.info["selection"]["candidates"] == [2, 3, 4]
    # Editing the chosen direction out of the weights removes (almost) all refusals (at most one of the 8
    # held-out prompts is still refused), and no finalist that removes as many does so with less damage to
    # the harmless next-token distributions.
    assert chosen.refusal_ablated <= 1 / 8 and chosen.kl_ablated < 1.0
    finalists = [d.stats[i] for i in d.info["selection"]["finalists"]]
    assert all(s.kl_ablated >= chosen.kl_ablated for s in finalists if s.refusal_ablated <= chosen.refusal_ablated)
    assert d.info["selection"]["weak"] is False
    assert chosen.accuracy >= 0.85 and chosen.separation >= 2  # and the direction separates held-out prompts
    # The preset's kernels, three times wider, were tried at the chosen layer and kept only if they removed
    # more refusals (a 5-point step), or as many with less damage, within the KL cap.
    sel, wider = d.info["selection"], d.info["selection"]["wider"]
    assert wider["breadth"] == cfg.select_breadth and 0 <= wider["refusal"] <= 1 and wider["kl"] > 0
    ours = (round(wider["refusal"] * 20), wider["kl"])
    wins = wider["kl"] <= cfg.max_kl and ours < (round(chosen.refusal_ablated * 20), chosen.kl_ablated)
    assert sel["breadth"] == (cfg.select_breadth if wins else 1.0)
    assert sel["refusal_ablated"] == (wider["refusal"] if wins else chosen.refusal_ablated)


def test_the_default_edit_is_as_wide_as_the_layer_choice_found_best():
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig

    d = _fake(num_layers=6)
    d.info["selection"] = {"breadth": 3.0}
    plain = EditConfig()
    wide = stages.default_edit(d, "best", plain)
    assert wide.attn.width == pytest.approx(3 * plain.attn.width)
    assert wide.mlp.width == pytest.approx(3 * plain.mlp.width)
    _, _, placed = stages.chosen_direction(d, "best", plain)
    assert placed.attn.width == pytest.approx(1.05) and placed.attn.peak == pytest.approx(0.4)
    # Never twice, never at a layer the choice did not test, never over kernels the user gave.
    assert stages.default_edit(d, "best", wide) == wide
    assert stages.default_edit(d, "0.5", plain) == plain
    narrow = EditConfig(attn={"width": 0.2})
    assert stages.default_edit(d, "best", narrow) == narrow
    d.info["selection"] = {"breadth": 1.0}
    assert stages.default_edit(d, "best", plain) == plain


def test_removal_spans_the_directions_of_every_prompt_set(tmp_path):
    from pipeline.edit.abliterate import edit_tensor

    d = _fake(num_layers=5, hidden=8)
    g = torch.Generator().manual_seed(9)
    d.set_directions = dirs.unit(torch.randn(2, 5, 8, generator=g))
    d.set_names = ("censored", "harmful")
    basis, info = dirs.removal(d, "best", per_set=True)
    assert basis.shape == (5, 2, 8) and info["rank"] == 2 and info["sets"] == ["censored", "harmful"]
    single, info1 = dirs.removal(d, "best", per_set=False)
    assert single.shape == (8,) and "rank" not in info1
    # An edit with the span removes both sets' directions (of the chosen layer) from a weight.
    w = torch.nn.Linear(8, 8, bias=False)
    w.weight.data = torch.randn(8, 8, generator=g)
    out = dirs.unit(d.set_directions[:, 2])
    assert (out @ w.weight.data).abs().max() > 1e-2
    edited = edit_tensor(w.weight.data, basis[0], 0, 1.0)
    assert (out @ edited).abs().max() < 1e-5
    # Saved and loaded with the rest.
    dirs.save(d, tmp_path)
    back = dirs.load(tmp_path)
    assert back.set_names == d.set_names and torch.equal(back.set_directions, d.set_directions)


def test_candidate_layers_cover_the_middle_of_the_depth():
    from pipeline.edit.selection import candidate_layers

    assert candidate_layers(24, 0.3, 0.8) == list(range(7, 19))
    assert candidate_layers(6, 0.3, 0.8) == [2, 3, 4]
    assert candidate_layers(2, 0.3, 0.8) == [1]
