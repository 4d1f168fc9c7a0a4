"""The tree's GPU kernels against the eager forward and the per-token reference (CUDA only), and the
activation probe and the CPU fallback (everywhere)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from model_compress.fff.kernels import fast_hard_forward
from model_compress.fff.kernels.activation import ACTIVATIONS, kernel_activation
from model_compress.fff.tree import FastFeedForward, per_token_reference

CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="the Triton kernels need CUDA")


@pytest.mark.parametrize(
    "module, name",
    [(nn.SiLU(), "silu"), (ACT2FN["silu"], "silu"), (nn.GELU(), "gelu"), (ACT2FN["gelu"], "gelu"),
     (ACT2FN["gelu_new"], "gelu_tanh"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.ReLU(), "relu")],
)
def test_the_probe_names_the_activation_whatever_its_class(module, name):
    assert ACTIVATIONS[kernel_activation(module)] == name


def test_an_activation_the_kernels_do_not_know_is_refused_and_the_cpu_takes_the_eager_path():
    assert kernel_activation(nn.Tanh()) is None and kernel_activation(ACT2FN["quick_gelu"]) is None
    tree = FastFeedForward(16, 2, 4, nn.GELU())
    assert fast_hard_forward(tree, torch.randn(3, 16)) is None


def _tree(hidden, depth, width, activation, gated, shared, top, dtype):
    torch.manual_seed(depth * 100 + width)
    tree = FastFeedForward(hidden, depth, width, activation, gated=gated, in_bias=not gated, out_bias=not gated,
                           shared_width=shared, leaves_per_token=top, dtype=dtype, device="cuda")
    with torch.no_grad():
        for parameter in tree.parameters():
            parameter.normal_(0, hidden**-0.5)
    return tree.eval()


CASES = [  # hidden, depth, leaf width, activation, gated, shared, leaves per token
    (72, 3, 37, nn.SiLU(), True, 19, 1),
    (64, 1, 48, nn.GELU(), False, 0, 1),
    (96, 4, 24, nn.GELU(approximate="tanh"), False, 40, 1),
    (80, 6, 11, nn.ReLU(), False, 0, 1),
    (72, 3, 37, nn.SiLU(), True, 19, 2),
    (64, 4, 20, nn.GELU(), False, 8, 3),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 100, 2048])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}-d{c[1]}-w{c[2]}-s{c[5]}-k{c[6]}-{'glu' if c[4] else 'plain'}")
def test_kernels_equal_the_eager_forward_and_the_reference(dtype, tokens, case):
    hidden, depth, width, activation, gated, shared, top = case
    tree = _tree(hidden, depth, width, activation, gated, shared, top, dtype)
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    with torch.inference_mode():
        fast = fast_hard_forward(tree, x)
        eager = tree.eager_hard_forward(x)
        reference = per_token_reference(tree, x[: min(tokens, 64)]).to(dtype)
    assert fast is not None and fast.dtype == dtype and fast.shape == (tokens, hidden)
    scale = eager.float().abs().max().item()
    bound = (2e-3 if dtype == torch.float16 else 1.6e-2) * scale + 1e-3
    assert (fast.float() - eager.float()).abs().max().item() <= bound
    assert (fast[:64].float() - reference.float()).abs().max().item() <= 2 * bound


@needs_cuda
@pytest.mark.parametrize("tokens, top", [(1, 1), (100, 1), (5000, 1), (7, 3), (3000, 2)])
def test_the_counting_sort_puts_every_row_once_in_leaf_order(tokens, top):
    from model_compress.fff.kernels.triton_schedule import sort_by_leaf, sort_by_route

    tree = _tree(64, 4, 16, nn.GELU(), False, 8, top, torch.float16)
    x = torch.randn(tokens, 64, dtype=torch.float16, device="cuda")
    with torch.inference_mode():
        if top == 1:
            leaf = tree.route(x)
            order, token_of_row, counts = sort_by_route(tree.router_logits(x), 4)
        else:
            leaf = tree.routes(x).reshape(-1)
            order, token_of_row, counts = sort_by_leaf(leaf, tree.num_leaves, top)
    order = order.long()
    assert torch.equal(counts.long(), torch.bincount(leaf, minlength=tree.num_leaves))
    assert torch.equal(order.sort().values, torch.arange(leaf.numel(), device="cuda"))
    assert torch.equal(leaf[order], leaf.sort().values)
    assert torch.equal(token_of_row.long(), order // top)


@needs_cuda
@pytest.mark.parametrize("tokens", [5, 100, 2048])
def test_the_grouped_kernels_when_every_token_takes_one_leaf(tokens):
    """The other leaves get no rows: empty leaves among the counts, and spare tiles."""
    tree = _tree(96, 3, 32, nn.SiLU(), True, 16, 1, torch.float16)
    with torch.no_grad():
        tree.router_bias.copy_(torch.tensor([50.0, 0, -50.0, 0, 0, -50.0, 0]))  # right, left, left: leaf 4
    x = torch.randn(tokens, 96, dtype=torch.float16, device="cuda")
    with torch.inference_mode():
        assert set(tree.route(x).tolist()) == {4}
        fast, eager = fast_hard_forward(tree, x), tree.eager_hard_forward(x)
    assert (fast.float() - eager.float()).abs().max().item() <= 2e-3 * eager.float().abs().max().item() + 1e-3


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 300])
def test_the_kernels_run_inside_a_cuda_graph(tokens):
    tree = _tree(128, 3, 40, nn.SiLU(), True, 24, 1, torch.float16)
    static = torch.randn(tokens, 128, dtype=torch.float16, device="cuda")
    with torch.inference_mode():
        for _ in range(2):  # compile the kernels before the capture
            tree.hard_forward(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tree.hard_forward(static)
        for seed in range(3):  # new inputs, new routes: the replay follows them
            static.copy_(torch.randn(tokens, 128, dtype=torch.float16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
            graph.replay()
            eager = tree.eager_hard_forward(static)
            assert (out.float() - eager.float()).abs().max().item() <= 2e-3 * eager.float().abs().max().item() + 1e-3


@needs_cuda
def test_training_keeps_the_eager_path_for_its_gradients():
    tree = _tree(64, 2, 16, nn.GELU(), False, 0, 1, torch.float16)
    x = torch.randn(40, 64, dtype=torch.float16, device="cuda")
    out = tree.hard_forward(x)
    out.float().sum().backward()
    assert tree.leaf_out.grad is not None
