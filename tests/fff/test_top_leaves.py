"""Several leaves per token (--leaves-per-token): the most probable paths, their outputs added."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model_compress
from model_compress.core.errors import UserError
from model_compress.core.text import Text
from model_compress.fff.distill import FFFSettings, validate_settings
from model_compress.fff.pipeline import distill_fff
from model_compress.fff.tree import FastFeedForward, per_token_reference
from model_compress.fff.tree_init import _error, _refit_outputs, initialise_tree

from ..conftest import ENGLISH
from .test_fff import HIDDEN, WIDTH, random_dense


def _random_top_tree(depth: int, top: int, gated: bool, shared: int = 6) -> FastFeedForward:
    torch.manual_seed(1)
    tree = FastFeedForward(HIDDEN, depth, 5, nn.SiLU() if gated else nn.GELU(), gated=gated, in_bias=not gated,
                           shared_width=shared, leaves_per_token=top)
    with torch.no_grad():
        for parameter in tree.parameters():
            parameter.normal_(0, 0.3)
    return tree.eval()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("depth, top", [(2, 2), (3, 2), (3, 3)])
def test_top_leaves_forward_equals_the_per_token_reference(gated, tokens, depth, top):
    tree = _random_top_tree(depth, top, gated)
    x = torch.randn(tokens, HIDDEN)
    torch.testing.assert_close(tree.hard_forward(x), per_token_reference(tree, x), rtol=1e-5, atol=1e-5)


def test_the_first_leaf_is_the_sign_path_and_the_second_differs_at_the_least_certain_node():
    tree = _random_top_tree(3, 2, False)
    x = torch.randn(400, HIDDEN)
    routes = tree.routes(x)
    assert torch.equal(routes[:, 0], tree.route(x))
    logits = tree.router_logits(x)
    for token in range(0, 400, 37):
        best, second = routes[token].tolist()
        path = [node for node in range(7) if tree._paths(x.device, x.dtype)[node, best] != 0]
        weakest = min(path, key=lambda node: abs(logits[token, node]))
        flipped = tree._paths(x.device, x.dtype)[weakest, second] == -tree._paths(x.device, x.dtype)[weakest, best]
        assert flipped  # the runner-up turns the other way where the best path was least sure


def test_every_leaf_per_token_is_the_dense_block():
    dense = random_dense(True, seed=3)
    tree = FastFeedForward(HIDDEN, 2, WIDTH // 4, dense.activation, gated=True, in_bias=False, out_bias=False, leaves_per_token=4)
    x = torch.randn(200, HIDDEN)
    initialise_tree(tree, dense, x, refit=False)
    with torch.no_grad():
        torch.testing.assert_close(tree.hard_forward(x), dense.forward(x), rtol=1e-4, atol=1e-5)


def test_the_refit_with_two_leaves_per_token_never_raises_the_error():
    dense = random_dense(False, seed=4)
    tree = FastFeedForward(HIDDEN, 3, 6, dense.activation, shared_width=16, leaves_per_token=2)
    x = torch.randn(3000, HIDDEN)
    initialise_tree(tree, dense, x, refit=False)
    target = dense.forward(x)
    with torch.no_grad():
        routes = tree.routes(x)
        before = _error(tree, x, target, routes)
        _refit_outputs(tree, x, target, routes)
        after = _error(tree, x, target, routes)
    assert after < before, (before, after)


def test_two_leaves_per_token_lower_the_error_at_the_same_budget():
    dense = random_dense(True, seed=6)
    x, held = torch.randn(3000, HIDDEN), torch.randn(1000, HIDDEN)
    errors = []
    for depth, top in ((2, 1), (3, 2)):  # one leaf of 1/4, or two leaves of 1/8: a quarter of the neurons either way
        tree = FastFeedForward(HIDDEN, depth, WIDTH // 2**depth, dense.activation, gated=True, in_bias=False, out_bias=False,
                               leaves_per_token=top)
        initialise_tree(tree, dense, x)
        with torch.no_grad():
            errors.append(_error(tree, held, dense.forward(held), tree.routes(held)))
    assert errors[1] < errors[0], errors


def test_the_shared_part_makes_room_for_the_leaves():
    settings = FFFSettings(depth=3, neurons_per_token=0.375, leaves_per_token=2)
    shared = settings.shared_width_for(1536)
    assert shared == 256 and settings.leaf_width_for(1536) == 160  # 256 + 2 x 160 = 576 = 37.5% of 1536
    assert FFFSettings(depth=3, neurons_per_token=0.25, leaves_per_token=2).shared_width_for(1536) == 0


@pytest.mark.parametrize("neurons", [1536, 3072, 4864, 8192])
@pytest.mark.parametrize("share, depth, top", [(0.25, 3, 1), (0.5, 3, 1), (0.125, 4, 1), (0.25, 4, 2), (0.375, 5, 4)])
def test_a_real_blocks_shared_part_is_a_multiple_of_16_and_keeps_the_budget(neurons, share, depth, top):
    settings = FFFSettings(depth=depth, neurons_per_token=share, leaves_per_token=top)
    shared, width = settings.shared_width_for(neurons), settings.leaf_width_for(neurons)
    assert shared % 16 == 0
    assert abs(shared + top * width - share * neurons) <= 0.01 * neurons + top * 2**depth  # rounding of the leaves too


def test_a_tiny_blocks_shared_part_is_not_rounded_to_16():
    settings = FFFSettings(depth=3, neurons_per_token=0.25)
    assert settings.shared_width_for(64) == 9  # 64 (0.25 * 8 - 1) / 7 = 9.1: 16 or 0 would move the budget by 11%


@pytest.mark.parametrize(
    "settings, message",
    [
        (FFFSettings(depth=3, leaves_per_token=9), "between 1 and the 8 leaves of a depth-3 tree"),
        (FFFSettings(depth=3, leaves_per_token=0), "between 1 and the 8 leaves"),
        (FFFSettings(depth=3, neurons_per_token=0.2, leaves_per_token=2), "needs --depth 4 or more: at depth 3 2 leaves alone hold 2/8"),
    ],
)
def test_bad_leaf_counts_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=message):
        validate_settings(settings)


def test_a_two_leaf_tree_saves_and_loads_to_the_same_outputs(tiny_folder, tmp_path):
    settings = FFFSettings(depth=2, neurons_per_token=0.75, leaves_per_token=2, steps=4, calib_tokens=1024, seq_len=64)
    run = distill_fff(str(tiny_folder("llama")), tmp_path / "out", settings, Text("english", "test", [ENGLISH] * 8))
    assert all(spec["leaves_per_token"] == 2 and spec["shared_width"] > 0 for spec in run.config.blocks.values())
    loaded = model_compress.load(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(abs(b.neurons_per_token - 0.75) < 0.05 for b in run.summary.blocks)


def test_a_deep_tree_asks_for_the_calibration_its_routers_need(tiny_folder, tmp_path):
    settings = FFFSettings(depth=6, steps=0, calib_tokens=512, seq_len=64)
    with pytest.raises(UserError, match="at least 1,024 are needed \\(16 per leaf of a depth-6 tree"):
        distill_fff(str(tiny_folder("llama")), tmp_path / "out", settings, Text("english", "test", [ENGLISH[:2000]]))
    assert not (tmp_path / "out").exists()
