"""Forward paths of the RPQ modules, in plain torch: the reference, the CPU path, and the fallback.

The reference decodes the weight and calls ``F.linear``. The faster forms never build the weight:

* Linear, few tokens: piece h of the output is ``codebooks[h]^T @ hist_h``, where ``hist_h[k]`` sums
  the inputs whose code in codebook h is k. One scatter-add builds all M histograms, one batched
  matrix product applies the codebooks. No Python loop over codebooks.
* Embedding: gather only the rows the batch asks for.
* Tied head (logits against an RPQ embedding table): ``x_h @ codebooks[h]^T`` scores every code of
  codebook h once; each vocabulary row then sums the scores of its M codes.

On CUDA with Triton installed, the same entry points run the Triton kernels of ``kernels/triton/``
instead, routed by token count through the table in ``config/routes.py`` that was measured on the
device; each layer (or group of layers) keeps the route it was given per token count. Everything else
(CPU, no Triton, the ``triton`` option off) takes the torch forms here, which are also what the kernels
are tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import routes as triton_dispatch
from .layout import EMBEDDING, LINEAR, code_scores, decode, lookup
from .config.norm_spec import NormedInputLike, NormSpec
from .config import options

# The histogram form costs about tokens * M * in scatter-adds, decoding the weight about out * in
# gathers at twice the price each; so it wins while tokens < 2 * out / M = 2 * D. Measured on the
# CPU by benchmarks/rpq/forward_dispatch.py (benchmarks/RESULTS.md, "torch forward dispatch").
HISTOGRAM_TOKENS_PER_PIECE = 2
# The tied head's per-code gather holds an (M, tokens, vocab) temporary: keep it under this size.
TIED_HEAD_GATHER_BYTES = 64 * 1024 * 1024


def _triton_kernels():
    """The Triton module, or None where Triton is missing or switched off (``options.triton``)."""
    return _imported_triton_kernels() if options.current().triton else None


@functools.cache
def _imported_triton_kernels():
    try:
        from . import triton as triton_kernels
    except ImportError:
        return None
    return triton_kernels


def release_workspaces() -> None:
    """Drop the Triton kernels' kept workspaces, if they ever ran (made again by the next call that needs one)."""
    module = _imported_triton_kernels() if _imported_triton_kernels.cache_info().currsize else None
    if module is not None:
        module.clear_workspaces()


def gpu_kernels(tensor: Tensor):
    """The Triton kernels module when ``tensor`` is on CUDA and Triton can run, else None."""
    if tensor.device.type != "cuda":
        return None
    return _triton_kernels()


def linear_reference(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """Decode the full weight, then ``F.linear``: the definition every faster path is checked against."""
    return F.linear(x, decode(codebooks, indices, LINEAR).to(x.dtype), bias)


def linear_histogram(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """y = W x without W: an M x K histogram of x per token, then one (K x D) product per codebook."""
    num_codebooks, codebook_size, piece = codebooks.shape
    in_features = indices.shape[1]
    rows = x.reshape(-1, in_features)
    tokens = rows.shape[0]
    # Accumulate in float32: a bin sums in / K inputs on average, which fp16 would round badly.
    hist = torch.zeros(tokens, num_codebooks, codebook_size, device=x.device, dtype=torch.float32)
    hist.scatter_add_(
        2,
        indices.long().unsqueeze(0).expand(tokens, -1, -1),
        rows.float().unsqueeze(1).expand(-1, num_codebooks, -1),
    )
    out = torch.bmm(hist.transpose(0, 1).to(codebooks.dtype), codebooks)  # (M, tokens, D)
    out = out.transpose(0, 1).reshape(*x.shape[:-1], num_codebooks * piece).to(x.dtype)
    return out if bias is None else out + bias


@dataclass(frozen=True)
class LinearRoute:
    """What an RPQ Linear's forward runs for one token count: ``binned``, ``fused`` (with ``tile``), ``decode``
    or ``torch``. Chosen once per (layer, token count, device, options) and kept by the layer."""

    kind: str
    tile: triton_dispatch.TileConfig | None = None


BINNED_ROUTE, FUSED_ROUTE, DECODE_ROUTE, TORCH_ROUTE = "binned", "fused", "decode", "torch"


def choose_linear_route(tokens: int, codebooks: Tensor, in_features: int, has_bins: bool, triton_kernels) -> LinearRoute:
    """The route table's choice for this call, narrowed to what these codebooks and the options allow."""
    if triton_kernels is None:
        return LinearRoute(TORCH_ROUTE)
    chosen = triton_dispatch.route(tokens, _weights(codebooks, in_features))
    if chosen.path == triton_dispatch.FUSED and chosen.tile.kind == triton_dispatch.BINNED:
        if has_bins and _takes_binned(triton_kernels, chosen, codebooks):
            return LinearRoute(BINNED_ROUTE, chosen.tile)
        chosen = triton_dispatch.Route(chosen.max_tokens, chosen.path, triton_dispatch.ONE_TOKEN_GATHER)
    if chosen.path == triton_dispatch.FUSED and _tiles_fit(chosen.tile, codebooks):
        return LinearRoute(FUSED_ROUTE, chosen.tile)
    return LinearRoute(DECODE_ROUTE)


def linear_forward(
    x: Tensor,
    codebooks: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    bins: Callable[[], tuple[Tensor, Tensor]] | None = None,
    norm: NormedInputLike | None = None,
    routes: dict | None = None,
) -> Tensor:
    """RPQ Linear forward: the routed Triton path on CUDA; else the histogram form for few tokens, decode + GEMM otherwise.

    ``bins`` gives ``layout.code_bins`` of ``indices`` (kept by the module, made on first use) for
    the binned kernel; without it (or with the ``bins`` option off) that route takes the
    one-token gather tile, which reads the codes themselves. ``norm`` (``fused_norm``): x is the
    input of a norm this layer applies, inside the binned kernel or else by the norm's own forward.
    ``routes`` is the layer's store of chosen routes: a call with a token count seen before (on the
    same device, under the same options) takes its route from there instead of choosing again.
    """
    tokens = x.numel() // indices.shape[1]
    triton_kernels = gpu_kernels(x)
    key = (tokens, x.device, codebooks.dtype, options.current())
    chosen = routes.get(key) if routes is not None else None
    if chosen is None:
        chosen = choose_linear_route(tokens, codebooks, indices.shape[1], bins is not None, triton_kernels)
        if routes is not None:
            routes[key] = chosen
    if chosen.kind == BINNED_ROUTE:
        if norm is not None:  # the kernel normalises x; its bias carries the norm's W beta
            bias = norm.fused_bias
        return triton_kernels.linear_binned(x, codebooks, bins(), bias, chosen.tile, norm and norm.norm.spec)
    x = x if norm is None else norm.norm.normalized(x)
    if chosen.kind == FUSED_ROUTE:
        return triton_kernels.linear_fused(x, codebooks, indices, bias, chosen.tile)
    if chosen.kind == DECODE_ROUTE:
        return triton_kernels.linear_decode(x, codebooks, indices, bias)
    return linear_torch(x, codebooks, indices, bias)


def linear_torch(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None) -> Tensor:
    """The torch forms only (any codes, any device): the histogram for a few tokens, decode + GEMM otherwise."""
    if histogram_serves(x.numel() // codes.shape[1], codebooks):
        return linear_histogram(x, codebooks, codes, bias)
    return linear_reference(x, codebooks, codes, bias)


def histogram_serves(tokens: int, codebooks: Tensor) -> bool:
    """Whether ``linear_torch`` computes this many tokens by histogram (a few tokens) rather than decoding W."""
    return tokens <= HISTOGRAM_TOKENS_PER_PIECE * codebooks.shape[2]


def gated_linear_forward(
    gate: Tensor,
    up: Tensor,
    codebooks: Tensor,
    bias: Tensor | None,
    bins: Callable[[], tuple[Tensor, Tensor]],
    routes: dict | None = None,
) -> Tensor | None:
    """The layer applied to silu(gate) * up in one binned launch (``fused_glu``); None where that route does not apply.

    Only on CUDA with Triton, for token counts routed to the binned kernel; the caller forms the
    product itself everywhere else. ``routes``: the layer's store of chosen routes, as for ``linear_forward``.
    """
    outputs = linear_group_forward(gate, [(codebooks, bins, bias)], up=up, routes=routes)
    return None if outputs is None else outputs[0]


def choose_group_route(tokens: int, codebooks: Tensor, in_features: int, members: int, triton_kernels) -> LinearRoute | None:
    """The binned route for ``members`` same-shape layers in one launch, or None where one launch does not apply."""
    if triton_kernels is None or members > triton_kernels.MAX_GROUP:
        return None
    chosen = triton_dispatch.route(tokens, members * _weights(codebooks, in_features))
    return LinearRoute(BINNED_ROUTE, chosen.tile) if _takes_binned(triton_kernels, chosen, codebooks) else None


def linear_group_forward(
    x: Tensor,
    members: list[tuple[Tensor, Callable[[], tuple[Tensor, Tensor]], Tensor | None]],
    norm: NormSpec | None = None,
    up: Tensor | None = None,
    routes: dict | None = None,
) -> list[Tensor] | None:
    """Several RPQ Linears of one shape on the same ``x`` in one binned launch; None where that route does not apply.

    ``members``: (codebooks, bins callable, bias) each. Only on CUDA with Triton, for token counts
    routed to the binned kernel; everywhere else each layer runs its own forward. ``norm``: x is
    that norm's input, applied in the kernel (the biases must hold its W beta). ``up``: the input
    is silu(x) * up. ``routes``: the group's store of chosen routes (a call with a token count seen
    before, on the same device under the same options, takes its route from there).
    """
    triton_kernels = gpu_kernels(x)
    tokens = x.numel() // x.shape[-1]
    key = ("group", len(members), tokens, x.device, members[0][0].dtype, options.current())
    if routes is not None and key in routes:
        chosen = routes[key]
    else:
        chosen = choose_group_route(tokens, members[0][0], x.shape[-1], len(members), triton_kernels)
        if routes is not None:
            routes[key] = chosen
    if chosen is None:
        return None
    return triton_kernels.linear_binned_group(x, [(cb, bins(), bias) for cb, bins, bias in members], chosen.tile, norm, up=up)


def _takes_binned(triton_kernels, chosen: triton_dispatch.Route, codebooks: Tensor) -> bool:
    """Whether a routed call runs the binned kernel (a fused route whose tile is binned and fits these codebooks, bins on)."""
    return (
        chosen.path == triton_dispatch.FUSED
        and triton_dispatch.bins_enabled()
        and triton_kernels.binned_fits(chosen.tile, codebooks)
    )


def _tiles_fit(tile: triton_dispatch.TileConfig, codebooks: Tensor) -> bool:
    """A tile that wants whole codebooks gets them only where the layer's pieces tile its columns evenly."""
    return not tile.aligned or triton_dispatch.heads_per_tile(codebooks.shape[2], tile.block_n) > 0


def _weights(codebooks: Tensor, in_features: int) -> int:
    """in * out of an RPQ Linear: the size class its one-token route is chosen by."""
    return in_features * codebooks.shape[0] * codebooks.shape[2]


def embedding_forward(ids: Tensor, codebooks: Tensor, indices: Tensor) -> Tensor:
    """Rows ``ids`` of the table, decoding only those rows."""
    triton_kernels = gpu_kernels(codebooks)
    if triton_kernels is not None:
        return triton_kernels.embedding(ids, codebooks, indices)
    return embedding_torch(ids, codebooks, indices[:, ids.reshape(-1)])


def embedding_torch(ids: Tensor, codebooks: Tensor, codes: Tensor) -> Tensor:
    """Rows ``ids`` of the table from their codes (M, ids.numel()), already picked out."""
    num_codebooks, _, piece = codebooks.shape
    pieces = lookup(codebooks, codes)  # (M, tokens, D)
    return pieces.transpose(0, 1).reshape(*ids.shape, num_codebooks * piece)


def tied_head_reference(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """Logits against the decoded embedding table (the reference)."""
    return F.linear(x, decode(codebooks, indices, EMBEDDING).to(x.dtype), bias)


def tied_head_scores(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """Logits without the table: score each code once, then sum each row's M code scores."""
    vocab = indices.shape[1]
    scores = code_scores(x, codebooks)  # (M, tokens, K)
    tokens = scores.shape[1]
    picked = scores.gather(2, indices.long().unsqueeze(1).expand(-1, tokens, -1))  # (M, tokens, vocab)
    out = picked.sum(0).reshape(*x.shape[:-1], vocab).to(x.dtype)
    return out if bias is None else out + bias


def tied_head_forward(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """Tied LM head: per-code scores while their temporary is small, decode + GEMM otherwise."""
    num_codebooks = codebooks.shape[0]
    tokens = x.numel() // (num_codebooks * codebooks.shape[2])
    triton_kernels = gpu_kernels(x)
    if triton_kernels is not None:
        if tokens <= triton_dispatch.TIED_HEAD_SCORE_TOKENS:
            return triton_kernels.tied_head_scores(x, codebooks, indices, bias)
        return triton_kernels.tied_head_decode(x, codebooks, indices, bias, triton_dispatch.DECODE_CHUNK_BYTES)
    return tied_head_torch(x, codebooks, indices, bias)


def tied_head_torch(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None) -> Tensor:
    """The torch forms only: per-code scores while their temporary is small, decode + GEMM otherwise."""
    num_codebooks = codebooks.shape[0]
    tokens = x.numel() // (num_codebooks * codebooks.shape[2])
    if num_codebooks * tokens * codes.shape[1] * 4 <= TIED_HEAD_GATHER_BYTES:
        return tied_head_scores(x, codebooks, codes, bias)
    return tied_head_reference(x, codebooks, codes, bias)
