"""Starting a tree close to the dense block it replaces: leaves are the block's own neurons.

The neurons are split recursively down the tree, each split in two equal halves along the main
direction of their co-activation (the first principal component of what each neuron contributes,
token by token, on calibration inputs), so neurons that fire together share a subtree. Each router
is then fitted, by ridge regression on the calibration inputs that reach its node, to predict
whether the right or the left half contributes more to the token's output: a token goes where its
largest activations are. A leaf starts as its group of neurons (trimmed to the leaf width by
contribution, or padded with silent neurons). With every leaf at weight 1 the tree then computes
the dense block exactly; training teaches each leaf to stand in for the whole block.
"""

from __future__ import annotations

import torch

from .blocks import DenseWeights
from .tree import FastFeedForward

RIDGE = 1e-3  # relative to the mean diagonal of the inputs' second moment


def initialise_tree(tree: FastFeedForward, dense: DenseWeights, inputs: torch.Tensor, seed: int = 0) -> None:
    """Fill ``tree`` (float32, on ``inputs``' device) from ``dense`` and calibration ``inputs`` (tokens, hidden)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = inputs.float()
    contribution = dense.neuron_activations(x).abs() * dense.w_out.norm(dim=1)  # (tokens, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # svd_lowrank's random start
        groups, routed = _split_neurons(tree, x, contribution)
    with torch.no_grad():
        for leaf, neurons in enumerate(groups):
            tokens = routed == leaf
            weight = contribution[tokens].mean(0) if tokens.any() else contribution.mean(0)
            _fill_leaf(tree, leaf, dense, neurons, weight, generator)
        if tree.out_bias is not None:
            tree.out_bias.zero_()
            if dense.b_out is not None:
                tree.out_bias.copy_(dense.b_out)


def _split_neurons(tree: FastFeedForward, x: torch.Tensor, contribution: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Neuron groups per leaf (heap order) and each calibration token's leaf under the fitted routers."""
    node_neurons = {0: torch.arange(contribution.shape[1], device=x.device)}
    node_of_token = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for node in range(tree.num_leaves - 1):
        neurons = node_neurons.pop(node)
        reaching = node_of_token == node
        sample = reaching if reaching.sum() >= 2 else torch.ones_like(reaching)  # no tokens here: fit on all
        left, right = _halve(contribution[sample][:, neurons], neurons)
        node_neurons[2 * node + 1], node_neurons[2 * node + 2] = left, right
        weight, bias = _fit_router(x[sample], contribution[sample], left, right)
        with torch.no_grad():
            tree.router_weight[node].copy_(weight)
            tree.router_bias[node].copy_(bias)
        goes_right = (x[reaching] @ weight + bias) > 0
        node_of_token[reaching] = 2 * node + 1 + goes_right.long()
    first_leaf = tree.num_leaves - 1
    return [node_neurons[first_leaf + leaf] for leaf in range(tree.num_leaves)], node_of_token - first_leaf


def _halve(profiles: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two equal halves of ``neurons`` along the first principal component of their (tokens x neurons) profiles."""
    if neurons.numel() < 2:
        return neurons, neurons[:0]
    columns = profiles / (profiles.norm(dim=0, keepdim=True) + 1e-12)
    centred = (columns - columns.mean(1, keepdim=True)).T  # one row per neuron
    _, _, directions = torch.svd_lowrank(centred, q=2, niter=4)
    score = centred @ directions[:, 0]
    order = torch.argsort(score)
    half = neurons.numel() // 2
    return neurons[order[:half]], neurons[order[half:]]


def _fit_router(x: torch.Tensor, contribution: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of (right half's contribution - left half's) on the inputs: its sign routes."""
    target = contribution[:, right].sum(1) - contribution[:, left].sum(1)
    mean_x, mean_t = x.mean(0), target.mean()
    centred = x - mean_x
    gram = centred.T @ centred
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], device=x.device), centred.T @ (target - mean_t))
    return weight, mean_t - mean_x @ weight


def _fill_leaf(tree: FastFeedForward, leaf: int, dense: DenseWeights, neurons: torch.Tensor, weight: torch.Tensor, generator) -> None:
    """Copy the group's neurons into the leaf: the strongest ``leaf_width`` of them, or all plus silent padding."""
    width = tree.leaf_width
    if neurons.numel() > width:
        neurons = neurons[torch.argsort(weight[neurons], descending=True)[:width]]
    count = neurons.numel()
    tree.leaf_in[leaf].zero_()
    tree.leaf_out[leaf].zero_()
    tree.leaf_in[leaf, :count] = dense.w_in[neurons]
    tree.leaf_out[leaf, :count] = dense.w_out[neurons]
    if count < width:  # padded neurons: small random inputs so they can learn, zero output so they start silent
        scale = dense.w_in.std().item()
        noise = torch.randn(width - count, dense.hidden, generator=generator) * scale
        tree.leaf_in[leaf, count:] = noise.to(tree.leaf_in.device)
    if tree.leaf_in_bias is not None:
        tree.leaf_in_bias[leaf].zero_()
        if dense.b_in is not None:
            tree.leaf_in_bias[leaf, :count] = dense.b_in[neurons]
    if tree.leaf_gate is not None:
        tree.leaf_gate[leaf].zero_()
        tree.leaf_gate[leaf, :count] = dense.w_gate[neurons]
        if count < width:
            tree.leaf_gate[leaf, count:] = tree.leaf_in[leaf, count:]
