"""The Fast FeedForward tree (Belcak & Wattenhofer 2023): a binary router tree over small FF leaves.

Nodes are numbered as a heap: node n has children 2n+1 (left) and 2n+2 (right); the 2**depth leaves
follow the 2**depth - 1 routers in that order, so leaf l is heap node (2**depth - 1) + l. Each router
is one neuron; a positive pre-activation sends the token right.

Three forwards, one set of weights:
- soft (training): every leaf runs, weighted by the probability of the token's path to it, with the
  router logits divided by a temperature that training lowers towards hard routing;
- hard (inference): one leaf per token. Tokens are grouped by leaf so that all leaves run as one
  batched matmul over a padded (leaves, tokens-per-leaf, hidden) tensor; when there are fewer tokens
  than leaves (decoding) each token's leaf weights are gathered instead;
- all leaves at weight 1: exactly the dense block the tree was cut from (the initialisation check).

On CUDA in half precision the hard forward runs the Triton kernels of ``kernels`` (grouped GEMM over
leaves; a three-launch path for decoding); the eager forward here is their reference and the CPU path.

Leaf weights are stored neuron-major, (leaves, width, hidden) for both projections, so that the soft
forward is one dense FF over all leaves' neurons with the path probabilities as a per-neuron scale.

Beside the tree, ``shared_width`` neurons run for every token (the block's most used ones, as the
shared experts of MoE conversions): the block is shared part + one leaf, and with every leaf on it
is the dense block again. ``shared_width`` 0 is the plain tree.

``leaves_per_token`` k > 1 runs the k leaves whose paths override the least router margin (the sum of
|logit| over the nodes where a path goes against the router's sign: the hard routing's leaf scores 0,
the runner-up turns the other way at the least certain node; the low-temperature limit of the path
probabilities) and adds their outputs. Leaves are disjoint subsets of the block's neurons, so k leaves
are k times the neurons of one, and a token unsure at one node gets both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import fast_hard_forward


class FastFeedForward(nn.Module):
    """A drop-in replacement for a transformer FF block: hidden -> hidden through one leaf per token.

    ``gated`` leaves compute ``act(gate x) * (in x)`` (Llama's SwiGLU); plain leaves ``act(in x + b)``.
    ``self.training`` selects the soft forward at ``self.temperature``; eval mode descends hard.
    """

    def __init__(
        self,
        hidden: int,
        depth: int,
        leaf_width: int,
        activation: nn.Module,
        *,
        gated: bool = False,
        in_bias: bool = True,
        out_bias: bool = True,
        shared_width: int = 0,
        leaves_per_token: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (got {depth})")
        if leaf_width < 1:
            raise ValueError(f"leaf width must be positive (got {leaf_width})")
        if shared_width < 0:
            raise ValueError(f"shared width cannot be negative (got {shared_width})")
        if not 1 <= leaves_per_token <= 2**depth:
            raise ValueError(f"leaves per token must be between 1 and the {2**depth} leaves (got {leaves_per_token})")
        self.hidden, self.depth, self.leaf_width, self.gated = hidden, depth, leaf_width, gated
        self.shared_width, self.leaves_per_token = shared_width, leaves_per_token
        self.activation = activation
        self.temperature = 1.0
        self.use_kernels = True  # the GPU kernels where they apply (``kernels``); False: always the eager reference
        leaves, nodes = 2**depth, 2**depth - 1
        options = {"dtype": dtype, "device": device}
        self.router_weight = nn.Parameter(torch.zeros(nodes, hidden, **options))
        self.router_bias = nn.Parameter(torch.zeros(nodes, **options))
        self.leaf_in = nn.Parameter(torch.zeros(leaves, leaf_width, hidden, **options))
        self.leaf_in_bias = nn.Parameter(torch.zeros(leaves, leaf_width, **options)) if in_bias else None
        self.leaf_gate = nn.Parameter(torch.zeros(leaves, leaf_width, hidden, **options)) if gated else None
        self.leaf_out = nn.Parameter(torch.zeros(leaves, leaf_width, hidden, **options))
        self.out_bias = nn.Parameter(torch.zeros(hidden, **options)) if out_bias else None
        if shared_width:
            self.shared_in = nn.Parameter(torch.zeros(shared_width, hidden, **options))
            self.shared_in_bias = nn.Parameter(torch.zeros(shared_width, **options)) if in_bias else None
            self.shared_gate = nn.Parameter(torch.zeros(shared_width, hidden, **options)) if gated else None
            self.shared_out = nn.Parameter(torch.zeros(shared_width, hidden, **options))
        else:
            self.shared_in = self.shared_in_bias = self.shared_gate = self.shared_out = None

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, depth={self.depth}, leaves={self.num_leaves}, leaf_width={self.leaf_width}, "
            f"shared_width={self.shared_width}, leaves_per_token={self.leaves_per_token}, gated={self.gated}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.soft_forward(x, self.temperature)
        return self.hard_forward(x)

    # --- routing -----------------------------------------------------------------------------

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, nodes): every router's pre-activation; one small matmul."""
        return F.linear(x, self.router_weight, self.router_bias)

    def leaf_probabilities(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """(tokens, leaves): the product of sigmoid(logit / temperature) choices along each leaf's path."""
        right = torch.sigmoid(self.router_logits(x).float() / temperature)
        probabilities = right.new_ones(right.shape[0], 1)
        for level in range(self.depth):
            first = 2**level - 1
            p_right = right[:, first : first + 2**level]
            probabilities = torch.stack((probabilities * (1 - p_right), probabilities * p_right), dim=-1).flatten(1)
        return probabilities

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens,) leaf index of each token: the leaf whose path agrees with every router's sign (ties go left).

        Instead of descending level by level (a few kernels per level), all routers' signs (+1 right,
        -1 left) are scored against every leaf's path (+1 / -1 on its nodes, 0 elsewhere) in one
        matmul; only the token's own leaf scores ``depth``. Four kernels at any depth.
        """
        logits = self.router_logits(x)
        signs = torch.where(logits > 0, 1.0, -1.0).to(logits.dtype)
        return (signs @ self._paths(logits.device, logits.dtype)).argmax(1)

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, leaves_per_token) leaves of each token, the hard route's leaf first (one leaf: ``route``)."""
        if self.leaves_per_token == 1:
            return self.route(x)[:, None]
        return self.leaf_scores(x).topk(self.leaves_per_token, dim=1).indices

    def leaf_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, leaves): minus the router margin each leaf's path overrides (0 on the sign path), two matmuls."""
        logits = self.router_logits(x).float()
        paths = self._paths(logits.device, torch.float32)
        return -(F.relu(-logits) @ paths.clamp_min(0) + F.relu(logits) @ (-paths).clamp_min(0))

    def _paths(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(nodes, leaves): +1 where a leaf's path turns right at a node, -1 left, 0 off the path (cached)."""
        key = (device, dtype)
        cached = getattr(self, "_path_cache", {})
        if key not in cached:
            paths = torch.zeros(self.num_leaves - 1, self.num_leaves)
            for leaf in range(self.num_leaves):
                node = leaf + self.num_leaves - 1
                while node > 0:
                    parent = (node - 1) // 2
                    paths[parent, leaf] = 1.0 if node == 2 * parent + 2 else -1.0
                    node = parent
            cached[key] = paths.to(device, dtype)
            self._path_cache = cached
        return cached[key]

    # --- forwards ----------------------------------------------------------------------------

    def soft_forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Every leaf, weighted by its path probability (differentiable in routers and leaves)."""
        flat = x.reshape(-1, self.hidden)
        weights = self.leaf_probabilities(flat, temperature).to(flat.dtype)
        out = self._all_leaves(flat, weights.repeat_interleave(self.leaf_width, dim=1))
        return self._plus_shared(flat, out).reshape(x.shape)

    def all_leaves_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every leaf at weight 1: the dense FF the tree was initialised from (its neurons, partitioned)."""
        flat = x.reshape(-1, self.hidden)
        return self._plus_shared(flat, self._all_leaves(flat, None)).reshape(x.shape)

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``leaves_per_token`` leaves per token: the GPU kernels where they apply, else ``eager_hard_forward``."""
        flat = x.reshape(-1, self.hidden)
        if self.use_kernels and not (torch.is_grad_enabled() and (flat.requires_grad or self.leaf_in.requires_grad)):
            out = fast_hard_forward(self, flat)  # None where no kernel applies (CPU, float32, no Triton)
            if out is not None:
                return out.reshape(x.shape)
        return self.eager_hard_forward(x)

    def eager_hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The hard forward in PyTorch (the kernels' reference, and what trains): gathered weights for fewer rows
        than leaves, else grouped by leaf."""
        flat = x.reshape(-1, self.hidden)
        return self.routed_forward(flat, self.routes(flat)).reshape(x.shape)

    def routed_forward(self, flat: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden) through the given leaves: ``leaf`` is (tokens,) or (tokens, k) (the hard forward's
        second half; oracle routing)."""
        if leaf.dim() == 2 and leaf.shape[1] == 1:
            leaf = leaf[:, 0]
        if leaf.dim() == 2:  # k leaves: each token's row once per leaf, the k outputs summed
            rows = flat.repeat_interleave(leaf.shape[1], dim=0)
            out = self._leaves_only(rows, leaf.reshape(-1)).view(flat.shape[0], leaf.shape[1], self.hidden).sum(1)
        else:
            out = self._leaves_only(flat, leaf)
        if self.out_bias is not None:
            out = out + self.out_bias
        return self._plus_shared(flat, out)

    def _leaves_only(self, rows: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """Each row through its leaf, no bias and no shared part."""
        if rows.shape[0] < self.num_leaves:
            return self._gathered_leaves(rows, leaf)
        return self._grouped_leaves(rows, leaf)

    def leaf_activations(self, flat: torch.Tensor, leaf: int) -> torch.Tensor:
        """(tokens, leaf_width): what one leaf's neurons pass to its output projection, for every row of ``flat``."""
        bias = self.leaf_in_bias[leaf] if self.leaf_in_bias is not None else None
        pre = F.linear(flat, self.leaf_in[leaf], bias)
        return self._activate(pre, lambda: F.linear(flat, self.leaf_gate[leaf]))

    def shared_activations(self, flat: torch.Tensor) -> torch.Tensor:
        """(tokens, shared_width): what the always-on neurons pass to their output projection."""
        pre = F.linear(flat, self.shared_in, self.shared_in_bias)
        return self._activate(pre, lambda: F.linear(flat, self.shared_gate))

    def _plus_shared(self, flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the shared neurons' contribution (nothing to add for a plain tree)."""
        if not self.shared_width:
            return out
        return torch.addmm(out, self.shared_activations(flat), self.shared_out)

    def _all_leaves(self, flat: torch.Tensor, neuron_scale: torch.Tensor | None) -> torch.Tensor:
        neurons = self.num_leaves * self.leaf_width
        bias = self.leaf_in_bias.reshape(neurons) if self.leaf_in_bias is not None else None
        hidden = F.linear(flat, self.leaf_in.reshape(neurons, self.hidden), bias)
        hidden = self._activate(hidden, lambda: F.linear(flat, self.leaf_gate.reshape(neurons, self.hidden)))
        if neuron_scale is not None:
            hidden = hidden * neuron_scale
        out = hidden @ self.leaf_out.reshape(neurons, self.hidden)
        return out + self.out_bias if self.out_bias is not None else out

    def _activate(self, pre: torch.Tensor, gate) -> torch.Tensor:
        """act(pre) for plain leaves; act(gate) * pre for gated ones (``gate`` computed lazily)."""
        return self.activation(gate()) * pre if self.gated else self.activation(pre)

    def _gathered_leaves(self, flat: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """Each token multiplies its own leaf's weights: reads only the leaves in use (decode)."""
        rows = flat[:, :, None]  # (tokens, hidden, 1)
        hidden = torch.bmm(self.leaf_in[leaf], rows).squeeze(-1)  # (tokens, width)
        if self.leaf_in_bias is not None:
            hidden = hidden + self.leaf_in_bias[leaf]
        hidden = self._activate(hidden, lambda: torch.bmm(self.leaf_gate[leaf], rows).squeeze(-1))
        return torch.bmm(hidden[:, None, :], self.leaf_out[leaf]).squeeze(1)

    def _grouped_leaves(self, flat: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """Sort tokens by leaf into a zero-padded (leaves, capacity, hidden) block; two bmm's run all leaves."""
        leaves, tokens = self.num_leaves, flat.shape[0]
        order = torch.argsort(leaf, stable=True)
        counts = torch.bincount(leaf, minlength=leaves)
        capacity = int(counts.max())  # the one host sync: the padded block's size
        starts = torch.cumsum(counts, 0) - counts
        sorted_leaf = leaf[order]
        slot = sorted_leaf * capacity + (torch.arange(tokens, device=flat.device) - starts[sorted_leaf])
        padded = flat.new_zeros(leaves * capacity, self.hidden)
        padded[slot] = flat[order]
        padded = padded.view(leaves, capacity, self.hidden)
        hidden = torch.bmm(padded, self.leaf_in.transpose(1, 2))  # (leaves, capacity, width)
        if self.leaf_in_bias is not None:
            hidden = hidden + self.leaf_in_bias[:, None, :]
        hidden = self._activate(hidden, lambda: torch.bmm(padded, self.leaf_gate.transpose(1, 2)))
        grouped = torch.bmm(hidden, self.leaf_out).view(leaves * capacity, self.hidden)
        out = torch.empty_like(flat)
        out[order] = grouped[slot]
        return out


def neurons_per_token(depth: int, leaf_width: int, dense_width: int, shared_width: int = 0, leaves_per_token: int = 1) -> float:
    """The fraction of the dense block's neurons a token evaluates: its path's routers, the shared part and its leaves."""
    return (depth + shared_width + leaves_per_token * leaf_width) / dense_width


def per_token_reference(tree: FastFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The plain reference for the fast paths: walk the tree node by node and run the one leaf, token by
    token, in float32 (slow; tests and benchmarks check ``hard_forward`` against it). With several leaves per
    token, each leaf's path is walked and the |logit| of every node it goes against summed; the least run."""
    rows = []
    for token in x.reshape(-1, tree.hidden).float():
        out = sum(_reference_leaf(tree, token, leaf) for leaf in _reference_leaves(tree, token))
        if tree.shared_width:
            out = out + _reference_neurons(tree, token, tree.shared_in, tree.shared_in_bias, tree.shared_gate, tree.shared_out)
        rows.append(out + tree.out_bias.float() if tree.out_bias is not None else out)
    return torch.stack(rows)


def _reference_leaves(tree: FastFeedForward, token: torch.Tensor) -> list[int]:
    """The token's leaves, walking node by node: the sign path for one leaf, else the paths overriding least."""
    def logit(node: int) -> torch.Tensor:
        return token @ tree.router_weight[node].float() + tree.router_bias[node].float()

    if tree.leaves_per_token == 1:
        node = 0
        for _ in range(tree.depth):
            node = 2 * node + (2 if logit(node) > 0 else 1)
        return [node - (tree.num_leaves - 1)]
    overridden = []
    for leaf in range(tree.num_leaves):
        node, margin = leaf + tree.num_leaves - 1, 0.0
        while node > 0:
            parent = (node - 1) // 2
            goes_right, value = node == 2 * parent + 2, logit(parent)
            margin = margin + (value.clamp_min(0) if not goes_right else (-value).clamp_min(0))
            node = parent
        overridden.append(margin)
    return torch.stack(overridden).topk(tree.leaves_per_token, largest=False).indices.tolist()


def _reference_leaf(tree: FastFeedForward, token: torch.Tensor, leaf: int) -> torch.Tensor:
    bias = tree.leaf_in_bias[leaf] if tree.leaf_in_bias is not None else None
    gate = tree.leaf_gate[leaf] if tree.gated else None
    return _reference_neurons(tree, token, tree.leaf_in[leaf], bias, gate, tree.leaf_out[leaf])


def _reference_neurons(tree: FastFeedForward, token: torch.Tensor, w_in, b_in, w_gate, w_out) -> torch.Tensor:
    """One group of neurons (a leaf or the shared part) on one float32 token."""
    pre = w_in.float() @ token
    if b_in is not None:
        pre = pre + b_in.float()
    hidden = tree.activation(w_gate.float() @ token) * pre if tree.gated else tree.activation(pre)
    return hidden @ w_out.float()
