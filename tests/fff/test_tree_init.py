"""Trees built from their block: shared neurons, exact-subset leaves, classifier routers, refit, per-block shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model_compress
from model_compress.core.errors import UserError
from model_compress.core.text import Text
from model_compress.fff.allocate import Candidates, candidate_shares, choose_shares
from model_compress.fff.distill import FFFSettings, validate_settings
from model_compress.fff.pipeline import distill_fff
from model_compress.fff.tree import FastFeedForward, per_token_reference
from model_compress.fff.tree_init import _error, _halve, _refit_outputs, _split, initialise_tree, oracle_leaves

from ..conftest import ENGLISH
from .test_fff import HIDDEN, WIDTH, random_dense


def _tree(dense, depth: int, shared: int) -> FastFeedForward:
    gated = dense.w_gate is not None
    leaf = (WIDTH - shared) // 2**depth
    return FastFeedForward(HIDDEN, depth, leaf, dense.activation, gated=gated, in_bias=not gated, out_bias=not gated, shared_width=shared)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_part_and_leaves_partition_the_neurons_and_all_on_is_the_block(gated):
    dense = random_dense(gated)
    x = torch.randn(1500, HIDDEN)
    tree = _tree(dense, 2, 16)
    initialise_tree(tree, dense, x, refit=False)
    torch.testing.assert_close(tree.all_leaves_forward(x), dense.forward(x), rtol=1e-4, atol=1e-5)
    rows = torch.cat([tree.shared_in.detach(), tree.leaf_in.detach().reshape(-1, HIDDEN)])
    assert rows.shape[0] == WIDTH
    assert torch.equal(rows[torch.argsort(rows[:, 0])], dense.w_in[torch.argsort(dense.w_in[:, 0])])  # each neuron once


def test_the_shared_neurons_are_the_most_used_ones():
    dense = random_dense(False, seed=5)
    x = torch.randn(2000, HIDDEN)
    tree = _tree(dense, 2, 16)
    initialise_tree(tree, dense, x, refit=False)
    mass = (dense.neuron_activations(x).abs() * dense.w_out.norm(dim=1)).mean(0)
    shared = [int(torch.nonzero((dense.w_in == row).all(1))[0]) for row in tree.shared_in.detach()]
    assert set(shared) == set(torch.argsort(mass, descending=True)[:16].tolist())


def _planted_energy(tokens: int, neurons: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy where each token uses one hidden group of neurons strongly and the rest faintly; and the groups."""
    generator = torch.Generator().manual_seed(seed)
    group_of_neuron = torch.randperm(neurons, generator=generator) % groups
    group_of_token = torch.randint(0, groups, (tokens,), generator=generator)
    faint = torch.rand(tokens, neurons, generator=generator) * 0.2
    strong = (group_of_token[:, None] == group_of_neuron[None, :]).float() * (1 + torch.rand(tokens, neurons, generator=generator))
    return faint + strong, group_of_neuron


def test_the_split_recovers_planted_neuron_groups():
    mass, planted = _planted_energy(3000, 64, 4)
    groups = _split(torch.arange(64), mass, 2)
    assert [g.numel() for g in groups] == [16] * 4
    for group in groups:  # each leaf is exactly one planted group
        assert planted[group].unique().numel() == 1


def test_co_clustering_keeps_at_least_the_energy_of_its_principal_component_start():
    torch.manual_seed(3)
    energy = torch.rand(2000, 48).pow(3) * torch.rand(48)  # no planted structure: the refinement has work to do
    torch.manual_seed(7)  # the same random start for svd_lowrank in both
    right = _halve(energy)
    assert int(right.sum()) == 24

    def kept(side: torch.Tensor) -> float:
        return torch.maximum(energy[:, side].sum(1), energy[:, ~side].sum(1)).sum().item()

    columns = energy / energy.norm(dim=0, keepdim=True)
    centred = (columns - columns.mean(1, keepdim=True)).T
    torch.manual_seed(7)
    _, _, directions = torch.svd_lowrank(centred, q=2, niter=4)
    start = torch.zeros(48, dtype=torch.bool)
    start[torch.argsort(centred @ directions[:, 0])[24:]] = True
    assert kept(right) >= kept(start) - 1e-6


def test_learned_routers_beat_random_routing_and_come_near_the_oracle():
    dense = random_dense(True, seed=2)
    x = torch.randn(4000, HIDDEN)
    tree = _tree(dense, 3, 8)
    accuracy = initialise_tree(tree, dense, x[:3000], refit=False)
    fitted, fitted_target = x[:3000], dense.forward(x[:3000])
    with torch.no_grad():
        fitted_oracle = _error(tree, fitted, fitted_target, oracle_leaves(tree, fitted))
        fitted_routed = _error(tree, fitted, fitted_target, tree.route(fitted))
    held, target = x[3000:], dense.forward(x[3000:])
    with torch.no_grad():
        learned = _error(tree, held, target, tree.route(held))
        oracle = _error(tree, held, target, oracle_leaves(tree, held))
        random = _error(tree, held, target, torch.randint(0, tree.num_leaves, (held.shape[0],), generator=torch.Generator().manual_seed(0)))
    # a linear router on a random (untrained) block: it closes about half the gap from random to oracle routing
    assert learned < random and (random - learned) > 0.4 * (random - oracle), (learned, oracle, random)
    assert accuracy > 0.7 and fitted_oracle <= fitted_routed


def test_the_refit_never_raises_a_leafs_error_on_its_tokens():
    dense = random_dense(False, seed=4)
    x = torch.randn(3000, HIDDEN)
    tree = _tree(dense, 2, 8)
    initialise_tree(tree, dense, x, refit=False)
    target = dense.forward(x)
    with torch.no_grad():
        leaves = tree.route(x)
        before = [_error(tree, x[leaves == leaf], target[leaves == leaf], leaves[leaves == leaf]) for leaf in range(4)]
        _refit_outputs(tree, x, target, leaves)
        after = [_error(tree, x[leaves == leaf], target[leaves == leaf], leaves[leaves == leaf]) for leaf in range(4)]
    assert all(a <= b + 1e-6 for a, b in zip(after, before)) and sum(after) < sum(before), (before, after)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_hard_forward_with_a_shared_part_equals_the_per_token_reference(gated, tokens):
    torch.manual_seed(0)
    tree = FastFeedForward(HIDDEN, 3, 6, nn.SiLU() if gated else nn.GELU(), gated=gated, in_bias=not gated, shared_width=10)
    with torch.no_grad():
        for parameter in tree.parameters():
            parameter.normal_(0, 0.3)
    x = torch.randn(tokens, HIDDEN)
    torch.testing.assert_close(tree.eval().hard_forward(x), per_token_reference(tree, x), rtol=1e-5, atol=1e-5)


def test_shares_go_where_the_model_loses_most_and_keep_the_mean():
    settings = FFFSettings(depth=3, neurons_per_token=0.25)
    shares = candidate_shares(settings)
    assert shares[0] == 0.125 and shares[-1] == 0.5 and 0.25 in shares
    costly = Candidates(shares, [1.0 / s for s in shares])  # loses a lot, gains much from more neurons
    cheap = Candidates(shares, [0.01 / s for s in shares])
    chosen = choose_shares([costly, cheap, cheap, costly], 0.25)
    assert sum(chosen) / 4 <= 0.25 + 1e-9 and chosen[0] > chosen[1] and chosen[0] == chosen[3]
    assert sum(chosen) / 4 > 0.25 - 0.0625  # what the discrete steps leave is spent: no step of 1/16 still fits


@pytest.mark.parametrize(
    "settings, message",
    [
        (FFFSettings(neurons_per_token=0.0), "in \\(0, 1\\]"),
        (FFFSettings(neurons_per_token=1.5), "in \\(0, 1\\]"),
        (FFFSettings(depth=2, neurons_per_token=0.1), "needs --depth 4 or more"),
    ],
)
def test_bad_shares_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=message):
        validate_settings(settings)


def test_a_shared_allocated_tree_saves_and_loads_to_the_same_outputs(tiny_folder, tmp_path):
    settings = FFFSettings(depth=2, neurons_per_token=0.5, allocate=True, steps=0, calib_tokens=1024, seq_len=64)
    run = distill_fff(str(tiny_folder("llama")), tmp_path / "out", settings, Text("english", "test", [ENGLISH] * 8))
    specs = list(run.config.blocks.values())
    assert any(spec["shared_width"] > 0 for spec in specs)  # a block allocated the floor share (one leaf) has none
    loaded = model_compress.load(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model(ids).logits, rtol=1e-5, atol=1e-5)
    shares = [b.neurons_per_token for b in run.summary.blocks]
    assert sum(shares) / len(shares) <= 0.5 + 2 / 128  # the mean asked, plus the routers' few neurons
