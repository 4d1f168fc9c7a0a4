"""The Fast FeedForward tree and fff-distill: forwards against references, initialisation, training, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import model_compress
from model_compress.core.text import Text, calibration_text
from model_compress.core.errors import UserError
from model_compress.fff.blocks import DenseWeights, PassThrough, dense_weights, find_blocks, select_blocks
from model_compress.fff.capture import calibration_windows, record_blocks
from model_compress.fff.distill import FFFSettings, fit_block, relative_error
from model_compress.fff.tree import FastFeedForward, per_token_reference
from model_compress.fff.pipeline import distill_fff
from model_compress.fff.tree_init import initialise_tree

from ..conftest import ENGLISH, real_model_folder, tiny_model, tiny_tokenizer

HIDDEN, WIDTH = 32, 64


def random_dense(gated: bool, seed: int = 0) -> DenseWeights:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    return DenseWeights(
        w_in=randn(WIDTH, HIDDEN, scale=0.2),
        b_in=None if gated else randn(WIDTH, scale=0.1),
        w_gate=randn(WIDTH, HIDDEN, scale=0.2) if gated else None,
        w_out=randn(WIDTH, HIDDEN, scale=0.1),
        b_out=None if gated else randn(HIDDEN, scale=0.1),
        activation=nn.SiLU() if gated else nn.GELU(),
    )


def random_tree(depth: int, gated: bool, leaf_width: int = 8, dtype=torch.float32, seed: int = 0) -> FastFeedForward:
    torch.manual_seed(seed)
    tree = FastFeedForward(HIDDEN, depth, leaf_width, nn.SiLU() if gated else nn.GELU(), gated=gated, in_bias=not gated, dtype=dtype)
    with torch.no_grad():
        for parameter in tree.parameters():
            parameter.normal_(0, 0.3)
    return tree.eval()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("depth", [1, 3, 5])
@pytest.mark.parametrize("tokens", [1, 7, 200])  # fewer tokens than leaves take the gathered path, more the grouped one
def test_hard_forward_equals_per_token_reference(gated, depth, tokens):
    tree = random_tree(depth, gated)
    x = torch.randn(tokens, HIDDEN)
    expected = per_token_reference(tree, x)
    torch.testing.assert_close(tree.hard_forward(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_hard_forward_in_half_precision(dtype, tolerance):
    tree = random_tree(4, gated=True, dtype=dtype)
    x = torch.randn(300, HIDDEN, dtype=dtype)
    expected = per_token_reference(tree, x)
    routes_agree = tree.route(x) == torch.tensor([int(i) for i in _reference_leaves(tree, x)])
    got = tree.hard_forward(x).float()
    error = ((got - expected)[routes_agree].norm() / expected[routes_agree].norm()).item()
    assert routes_agree.float().mean() > 0.95 and error < tolerance


def _reference_leaves(tree: FastFeedForward, x: torch.Tensor) -> list[int]:
    logits = (x @ tree.router_weight.T + tree.router_bias).float()
    leaves = []
    for row in logits:
        node = 0
        for _ in range(tree.depth):
            node = 2 * node + (2 if row[node] > 0 else 1)
        leaves.append(node - (tree.num_leaves - 1))
    return leaves


def test_batched_shapes_and_every_leaf_used_once():
    tree = random_tree(3, gated=False)
    x = torch.randn(4, 50, HIDDEN)
    torch.testing.assert_close(tree(x), per_token_reference(tree, x.reshape(-1, HIDDEN)).reshape(4, 50, HIDDEN), rtol=1e-5, atol=1e-5)


def test_sharpest_soft_forward_approaches_hard():
    tree = random_tree(4, gated=True)
    x = torch.randn(500, HIDDEN)
    hard = tree.hard_forward(x)
    errors = [((tree.soft_forward(x, t) - hard).norm() / hard.norm()).item() for t in (1.0, 0.1, 1e-6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


def test_soft_leaf_probabilities_sum_to_one_and_follow_the_routers():
    tree = random_tree(3, gated=False)
    x = torch.randn(100, HIDDEN)
    probabilities = tree.leaf_probabilities(x, 1.0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(100))
    assert torch.equal(tree.leaf_probabilities(x, 1e-4).argmax(1), tree.route(x))


@pytest.mark.parametrize("gated", [False, True])
def test_initialised_tree_with_all_leaves_is_the_dense_block(gated):
    dense = random_dense(gated)
    x = torch.randn(1000, HIDDEN)
    tree = FastFeedForward(HIDDEN, 3, WIDTH // 8, dense.activation, gated=gated, in_bias=not gated, out_bias=not gated)
    initialise_tree(tree, dense, x, refit=False)
    expected = dense.forward(x)
    torch.testing.assert_close(tree.all_leaves_forward(x), expected, rtol=1e-4, atol=1e-5)
    # every neuron used exactly once across the leaves
    used = torch.cat([tree.leaf_in[leaf] for leaf in range(tree.num_leaves)])
    assert torch.equal(used[torch.argsort(used[:, 0])], dense.w_in[torch.argsort(dense.w_in[:, 0])])


def test_init_routes_tokens_to_their_strongest_neurons():
    """Tokens go to the leaf holding the neurons that contribute most to them, far better than at random."""
    dense = random_dense(False, seed=3)
    x = torch.randn(3000, HIDDEN)
    tree = FastFeedForward(HIDDEN, 2, WIDTH // 4, dense.activation)
    initialise_tree(tree, dense, x[:2000])
    contribution = dense.neuron_activations(x[2000:]).abs() * dense.w_out.norm(dim=1)
    per_leaf = torch.stack([contribution[:, _leaf_neurons(tree, dense, leaf)].sum(1) for leaf in range(4)], 1)
    chosen = per_leaf.gather(1, tree.route(x[2000:])[:, None]).squeeze(1)
    assert chosen.mean() > 1.15 * per_leaf.mean()


def _leaf_neurons(tree, dense, leaf) -> torch.Tensor:
    rows = tree.leaf_in[leaf].detach()
    return torch.tensor([int(torch.nonzero((dense.w_in == row).all(1))[0]) for row in rows])


def test_leaf_width_trims_or_pads_the_groups():
    dense = random_dense(False)
    x = torch.randn(500, HIDDEN)
    narrow = FastFeedForward(HIDDEN, 2, 5, dense.activation)
    initialise_tree(narrow, dense, x)
    wide = FastFeedForward(HIDDEN, 2, 40, dense.activation)
    initialise_tree(wide, dense, x, refit=False)
    torch.testing.assert_close(wide.all_leaves_forward(x), dense.forward(x), rtol=1e-4, atol=1e-5)  # padding is silent
    assert narrow.leaf_in.shape == (4, 5, HIDDEN) and wide.leaf_out[:, 16:].abs().sum() == 0


def _record(arch: str, tokens: int = 3000):
    model = tiny_model(arch)
    tokenizer = tiny_tokenizer(arch)
    blocks = find_blocks(model)
    windows = calibration_windows(tokenizer, Text("english", "test", [ENGLISH] * 8), 64, tokens, 256)
    return model, blocks, windows, record_blocks(model, blocks, windows, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_recorded_rows_are_the_blocks_inputs_and_outputs(arch):
    model, blocks, windows, records = _record(arch)
    assert len(blocks) == 2 and records[0].inputs.shape == (windows.tokens, 64)
    dense = dense_weights(model, blocks[1])
    torch.testing.assert_close(dense.forward(records[1].inputs), records[1].outputs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_distillation_lowers_held_out_error(arch):
    model, blocks, _, records = _record(arch)
    settings = FFFSettings(depth=2, steps=150, batch_tokens=256, lr=3e-3)
    untrained, _ = fit_block("b", 0, dense_weights(model, blocks[0]), records[0], FFFSettings(depth=2, steps=0))
    tree, result = fit_block("b", 0, dense_weights(model, blocks[0]), records[0], settings)
    held = slice(round(records[0].inputs.shape[0] * 0.9), None)
    held_x, held_y = records[0].inputs[held], records[0].outputs[held]
    assert result.final_error == pytest.approx(relative_error(tree, held_x, held_y))
    assert result.init_error == pytest.approx(relative_error(untrained, held_x, held_y))
    assert result.final_error < 0.85 * result.init_error


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_round_trip_through_save_and_load(arch, tiny_folder, tmp_path):
    folder = tiny_folder(arch)
    settings = FFFSettings(depth=2, steps=5, calib_tokens=1024, seq_len=64, e2e_steps=2)
    run = distill_fff(str(folder), tmp_path / "out", settings, Text("english", "test", [ENGLISH] * 8))
    loaded = model_compress.load(tmp_path / "out")
    trees = [m for m in loaded.modules() if isinstance(m, FastFeedForward)]
    assert len(trees) == 2 and sum(isinstance(m, PassThrough) for m in loaded.modules()) == (0 if arch == "llama" else 4)
    ids = torch.randint(5, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, run.model(input_ids=ids).logits)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fff" and len(config["blocks"]) == 2
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())["summary"]
    assert report["e2e"]["before"] is not None and len(report["blocks"]) == 2


def test_select_blocks_and_bad_layers():
    blocks = find_blocks(tiny_model("llama"))
    assert [b.index for b in select_blocks(blocks, "1")] == [1]
    assert [b.index for b in select_blocks(blocks, "0-1")] == [0, 1]
    for bad in ("2", "0-5", "a", "1-0"):
        with pytest.raises(UserError, match="--layers"):
            select_blocks(blocks, bad)


def test_unrecognised_model_names_the_supported_architectures():
    with pytest.raises(UserError, match="supported: Llama-style"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize(
    "settings,message",
    [
        (FFFSettings(depth=0), "--depth must be"),
        (FFFSettings(depth=8), "too deep"),  # 256 leaves > 128 neurons
        (FFFSettings(leaf_width=0), "--leaf-width must be positive"),
        (FFFSettings(layers="7"), "--layers"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message, tiny_folder, tmp_path):
    with pytest.raises(UserError, match=message):
        distill_fff(str(tiny_folder("llama")), tmp_path / "out", settings, Text("english", "test", [ENGLISH] * 8))
    assert not (tmp_path / "out").exists()


def test_short_calibration_text_is_refused(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="at least 512 are needed"):
        distill_fff(str(tiny_folder("llama")), tmp_path / "out", FFFSettings(depth=2), Text("short", "test", [ENGLISH[:300]]))


def test_packaged_calibration_text_is_not_the_eval_text():
    from model_compress.core.text import default_text

    real_model_folder("exllamav2", "exllamav2==0.3.2")
    calibration = calibration_text()
    evaluation = default_text().joined
    assert len(calibration.documents) > 100 and len(calibration.joined.split()) > 50_000
    assert not any(doc[:200] in evaluation for doc in calibration.documents)
