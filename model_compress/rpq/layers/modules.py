"""RPQ modules: drop-in replacements for nn.Linear / Conv1D, nn.Embedding and a tied LM head.

Tensors follow rpq-pytorch's names: ``codebooks`` (M, K, D) and ``indices``, the codes packed at
ceil(log2 K) bits (at K = 256 one ``uint8`` per code, rpq-pytorch's (M, n) layout). Codebooks are a
trainable Parameter in a float dtype, or an ``int8`` buffer with ``codebook_scales`` (M,), one
scale per codebook (a float16 value, kept in the model dtype so the layer computes in it). The modules hold no dense weight; ``dequantize()`` builds one on
request (for export, inspection or the reference forward).

The "native" form (8-bit codes, float codebooks, no input rotation: what rpq-pytorch stores) runs the Triton
kernels of ``kernels/triton`` and their fusions; every other form (the ones a bit budget picks) runs the packed
kernels of ``kernels/packed`` on CUDA (``kernels/packed_forward.py``) and the torch paths of ``kernels``
elsewhere (decode + GEMM, or a per-code histogram for a few tokens).

A module may carry an input rotation (``kernels/rotation.py``): ``rotation_signs`` (one bit per input
feature, packed into uint8, saved) and ``rotation_block`` (in the config). Its codes then encode W R; a Linear or a tied head
computes with x R, an embedding turns its decoded rows back with R^T.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .direct_reads import own_forward_sources
from .traced_sharing import traced_once
from ..kernels import forward as kernels
from ..kernels import packed_forward, packed_ops, plans
from ..kernels import rotation
from ..kernels.config import options
from ..kernels.config.packed_routes import NIBBLE_GROUP_TOKENS, layer_rotates_in_load
from ..kernels.plans import input_signature, plans_of
from ..kernels.layout import (
    CODEBOOK_DTYPES, EMBEDDING, INT8, LINEAR, code_bins, code_bits, codebook_values, decode, dtype_name, packed_width, unpack_codes,
)


def _register_codes(
    module: nn.Module,
    split: int,
    columns: int,
    num_codebooks: int,
    codebook_size: int,
    device,
    dtype,
    what: str,
    codebook_dtype: str | None = None,
    rotation_block: int | None = None,
    rotation_width: int | None = None,
) -> None:
    """Give ``module`` its code storage: ``codebooks`` (M, K, split / M), packed ``indices``, int8 scales if any,
    and the signs of its input rotation when ``rotation_block`` is given (``rotation_width`` of them).

    ``codebook_dtype``: "int8", a float dtype name, or None for ``dtype`` (the model's).
    """
    if num_codebooks < 1 or split % num_codebooks:
        raise ValueError(f"num_codebooks={num_codebooks} must divide {what}={split}")
    module.num_codebooks = num_codebooks
    module.codebook_size = codebook_size
    module.compute_dtype = dtype or torch.get_default_dtype()  # the model's dtype; follows .to() casts (_Codes._apply)
    module.code_bits = code_bits(codebook_size)
    module.columns = columns
    shape = (num_codebooks, codebook_size, split // num_codebooks)
    if codebook_dtype == INT8:
        module.register_buffer("codebooks", torch.zeros(shape, device=device, dtype=torch.int8))
        # the scales live in the model dtype (and follow its casts), so the layer computes in it; fitted
        # scales are float16 values (fit/codebooks.py), stored as such in a float16 checkpoint
        module.register_buffer("codebook_scales", torch.ones(num_codebooks, device=device, dtype=dtype or torch.get_default_dtype()))
    else:
        storage = CODEBOOK_DTYPES[codebook_dtype] if codebook_dtype else dtype
        module.codebooks = nn.Parameter(torch.empty(shape, device=device, dtype=storage))
        module.codebook_scales = None
    width = packed_width(columns, module.code_bits)
    module.register_buffer("indices", torch.zeros(num_codebooks, width, dtype=torch.uint8, device=device))
    _register_rotation(module, rotation_block, rotation_width, device)


def _register_rotation(module: nn.Module, block: int | None, width: int | None, device) -> None:
    """``rotation_signs`` (width / 8,) uint8 (packed bits) and ``rotation_block`` where the layer is rotated; None for
    both otherwise."""
    module.rotation_block = block
    if block is None:
        module.rotation_signs = None
        return
    if block < 8 or block & (block - 1) or width % block:
        raise ValueError(f"a rotation block must be a power of two of at least 8 dividing the width {width}, got {block}")
    module.register_buffer("rotation_signs", torch.zeros(rotation.packed_bytes(width), dtype=torch.uint8, device=device))


def _packed_paths():
    """The packed forward paths: as custom ops while ``torch.compile`` traces (``packed_ops``), else called directly."""
    return packed_ops if torch.compiler.is_compiling() else packed_forward


_PLANNED_TENSORS = frozenset({"codebooks", "codebook_scales", "indices", "bias", "rotation_signs", "decoded_weight"})


class _Codes:
    """What every RPQ module with its own codes offers: the codes unpacked, the codebooks as floats."""

    codebooks: Tensor
    codebook_scales: Tensor | None
    indices: Tensor
    code_bits: int
    columns: int
    compute_dtype: torch.dtype
    rotation_signs: Tensor | None
    rotation_block: int | None

    @property
    def native(self) -> bool:
        """One byte per code, float codebooks, no rotation: the rpq-pytorch form, which the Triton kernels read."""
        return self.code_bits == 8 and self.codebook_scales is None and self.rotation_block is None

    @property
    def rotated(self) -> bool:
        return self.rotation_block is not None

    def rotate_input(self, x: Tensor) -> Tensor:
        """x R, the input the codes multiply (x itself without a rotation); computed once for siblings that share it.

        Behind a norm that writes x R itself (``fusions.rotated_inputs``), the tensor it wrote passes as it is.
        """
        given = self._given_rotated(x)
        return self._rotate_here(x) if given is None else given

    def _given_rotated(self, x: Tensor) -> Tensor | None:
        """x R where it needs no rotation here: x itself without a rotation or where a fused norm wrote it; else None."""
        if self.rotation_block is None:
            return x
        if torch.compiler.is_compiling():  # a traced norm writes no x R: its readers make it (``_rotate_here``)
            return None
        written = self.__dict__.get("_rotated_by")
        return x if written is not None and written.holds(x) else None

    def _rotate_here(self, x: Tensor) -> Tensor:
        """x R made for this layer: once for siblings that share the rotation (``fusions.shared_rotation``), else alone."""
        if torch.compiler.is_compiling():  # siblings share one x R through the traced tensor, each with its own signs
            return traced_once(x, self.__dict__.get("_rotation_key"), lambda: self.rotate_alone(x))
        shared = self.__dict__.get("_shared_rotation")
        return shared(x) if shared is not None else self.rotate_alone(x)

    def rotates_in_load(self) -> bool:
        """Whether on CUDA this layer's launch for 1 to ``NIBBLE_GROUP_TOKENS`` tokens rotates its input as it loads it
        (its format and block, and the ``rotate_in_load`` option)."""
        return options.current().rotate_in_load and layer_rotates_in_load(
            self.codebooks.shape[2], self.codebook_size, self.codebook_dtype, self.in_features, self.rotation_block)

    def rotate_alone(self, x: Tensor) -> Tensor:
        """x R with this layer's own signs (one Triton launch on CUDA)."""
        if torch.compiler.is_compiling():  # the stored bits as they are: the traced graph unpacks nothing per step
            return packed_ops.rotate(x, self.rotation_signs, self.rotation_block)
        if plans.usable():
            return plans_of(self).get(("rotate", *input_signature(x)),
                                      lambda: packed_forward.rotate_plan(x, self.signs(x.dtype), self.rotation_block))(x)
        return _packed_paths().rotate(x, self.signs(x.dtype), self.rotation_block)

    def signs(self, dtype: torch.dtype = torch.int8) -> Tensor:
        """The rotation's +-1 signs (one per input feature) in ``dtype``, unpacked from the saved bits on first use and
        kept (derived data, never saved) until the buffer changes (a ``.to()``, a load): no cast on every call."""
        packed = self.rotation_signs
        if torch.compiler.is_compiling():  # traced: plain ops on the buffer, which the compiler folds
            return rotation.unpack_signs(packed).to(dtype)
        # an inference tensor (the model moved or loaded under torch.inference_mode) keeps no version counter; it
        # cannot be changed in place outside inference mode, and a .to() or a load gives it a new address anyway
        buffer_key = (packed.data_ptr(), packed.device, None if packed.is_inference() else packed._version)
        state = self.__dict__.get("_signs")
        if state is None or state[0] != buffer_key:  # first use, or the buffer moved or changed: old copies are stale
            state = (buffer_key, {})
            self.__dict__["_signs"] = state
        by_dtype = state[1]
        if dtype not in by_dtype:
            by_dtype[dtype] = rotation.unpack_signs(packed).to(dtype)
        return by_dtype[dtype]

    def set_signs(self, signs: Tensor) -> None:
        """Store +-1 ``signs`` (one per input feature) as the layer's rotation."""
        with torch.no_grad():
            self.rotation_signs.copy_(rotation.pack_signs(signs.to(self.rotation_signs.device)))
        plans.invalidate_all()  # kept launch plans hold the signs unpacked

    @property
    def codebook_dtype(self) -> str:
        return INT8 if self.codebook_scales is not None else dtype_name(self.codebooks.dtype)

    def codebook_values(self, dtype: torch.dtype | None = None) -> Tensor:
        """The codebooks (M, K, D) as float values (an int8 codebook times its scale, float32 by default), in ``dtype``."""
        return codebook_values(self.codebooks, self.codebook_scales, dtype)

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: the model's, whatever its codebooks are stored in (float16 codebooks
        of a float32 model decode to float32, so an embedding hands the model float32 hidden states)."""
        return self.compute_dtype

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """``.to()``, ``.half()`` and the rest: the compute dtype follows what the cast does to a float tensor."""
        result = super()._apply(fn, recurse)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        plans.invalidate_all()  # kept launch plans hold the tensors as they were
        return result

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module's signature
        """A load replaces or overwrites the codes, tables and signs that kept launch plans hold."""
        plans.invalidate_all()
        return super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value) -> None:  # noqa: ANN001 - nn.Module's signature
        if name in _PLANNED_TENSORS:  # a tensor kept launch plans hold is replaced
            plans.invalidate_all()
        super().__setattr__(name, value)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        if name in _PLANNED_TENSORS:
            plans.invalidate_all()
        super().register_buffer(name, tensor, persistent)

    @property
    def decoded(self) -> Tensor | None:
        """The weight decoded once by ``keep_decoded`` (in the model's basis), or None: the layer computes from its codes."""
        return self._buffers.get("decoded_weight")

    def keep_decoded(self, dtype: torch.dtype | None) -> int:
        """Keep the weight decoded in ``dtype`` (rotation undone: the layer then needs no x R) and multiply with it: plain
        matrix products, at the cost of the decoded weight's bytes (returned). A non-persistent buffer: it follows
        ``.to()``, is never saved, and the codes stay. ``None`` drops it."""
        if dtype is None:
            self._buffers.pop("decoded_weight", None)
            return 0
        with torch.no_grad():
            weight = self.dequantize().to(dtype)
        self.register_buffer("decoded_weight", weight, persistent=False)
        return weight.numel() * weight.element_size()

    def codes(self, select: Tensor | None = None) -> Tensor:
        """The codes (M, columns) as int64, or only the columns ``select``."""
        return unpack_codes(self.indices, self.code_bits, self.columns, select)

    def code_bytes(self) -> int:
        return self.indices.numel()


class RPQLinear(_Codes, nn.Module):
    """y = x W^T + b with W stored as codebooks + codes along the input dimension."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_codebooks: int,
        codebook_size: int = 256,
        bias: bool = True,
        device=None,
        dtype=None,
        codebook_dtype: str | None = None,
        rotation_block: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        _register_codes(
            self, out_features, in_features, num_codebooks, codebook_size, device, dtype, "out_features", codebook_dtype,
            rotation_block, in_features,
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def dequantize(self) -> Tensor:
        """The dense (out, in) weight these codes stand for (W = W' R^T in float32 where the input is rotated)."""
        if self.rotation_block is None:
            return decode(self.codebook_values(), self.codes(), LINEAR)
        weight = decode(self.codebook_values(torch.float32), self.codes(), LINEAR)
        return rotation.unrotate(weight, self.signs(), self.rotation_block)

    def code_bins(self) -> tuple[Tensor, Tensor]:
        """``layout.code_bins`` of the codes, for the GPU's binned kernel: made on first use, again if the codes change.

        Not a buffer: derived data, never saved; about 2-4 bytes per code on the device. Building it
        reads one size back to the host, so run a forward before capturing a CUDA graph (as any
        capture needs a warm-up).
        """
        key = (self.indices.data_ptr(), self.indices.device, self.indices._version)
        cached = self.__dict__.get("_code_bins")
        if cached is None or cached[0] != key:
            cached = (key, code_bins(self.indices, self.codebook_size))
            self.__dict__["_code_bins"] = cached
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.decoded is not None:  # keep_decoded: a plain product, in the model's basis
            norm = self.__dict__.get("_normed_input")  # fused_norm: x is the input of the norm before us
            return _decoded_product(x if norm is None else norm.norm.normalized(x), self.decoded, self.bias)
        if not self.native:
            rotated = self._given_rotated(x)
            if rotated is None:  # x R is made here: where it can, by the kernel as it loads x
                out = self._rotating_forward(x)
                if out is not None:
                    return out
                rotated = self._rotate_here(x)
            if torch.compiler.is_compiling():
                out = self._traced_sibling_output(rotated, rotating=False)
            else:
                group = self.__dict__.get("_packed_group")  # fusions.packed_groups: q/k/v in one launch at one token
                out = None if group is None else group.output(self, rotated)
            return self.forward_rotated(rotated) if out is None else out
        group = self.__dict__.get("_shared_input")  # shared_input.SharedInputGroup: q/k/v in one launch
        if group is not None and not any(member.decoded is not None for member in group.members):
            out = group.output(self, x)
            if out is not None:
                return out
        norm = self.__dict__.get("_normed_input")  # fused_norm.NormedInput: x is the input of the norm before us
        return kernels.linear_forward(x, self.codebooks, self.indices, self.bias, self.code_bins, norm, self._route_store())

    def _rotating_forward(self, x: Tensor) -> Tensor | None:
        """The layer on its input before the rotation, in one launch that rotates x as it loads it (1 to
        ``NIBBLE_GROUP_TOKENS`` tokens on CUDA: ``packed_forward.rotating_linear_plan``, or the siblings' launch); None
        where that does not apply."""
        if torch.compiler.is_compiling() and self.__dict__.get("_group_key") is not None:  # a key, not the group object
            return self._traced_sibling_output(x, rotating=True)
        group = self.__dict__.get("_packed_group")
        if group is not None:
            return group.output_rotating(self, x)
        if torch.compiler.is_compiling():
            if x.numel() > NIBBLE_GROUP_TOKENS * self.in_features or not self.rotates_in_load():
                return None
            return packed_ops.rotating_linear(x, self.indices, self.codebooks, self.codebook_scales, self.bias, self.code_bits,
                                              self.in_features, self.rotation_signs, self.rotation_block)
        arguments = (x, self.indices, self.codebooks, self.codebook_scales, self.bias, self.code_bits, self.in_features,
                     self.rotation_signs, self.rotation_block)
        if plans.usable():
            plan = plans_of(self).get(("rotating", *input_signature(x)), lambda: packed_forward.rotating_linear_plan(*arguments))
        else:
            plan = packed_forward.rotating_linear_plan(*arguments)
        return None if plan is None else plan(x)

    def _traced_sibling_output(self, x: Tensor, rotating: bool) -> Tensor | None:
        """Under ``torch.compile``: this layer's output of its siblings' one op (``fusions.packed_groups``), which the
        first of them to be called traces and the others read from the traced tensor (only the first reaches the
        group); None where the op does not apply, or for a layer in no group. ``rotating``: x comes before the rotation."""
        key = self.__dict__.get("_group_key")
        if key is None:
            return None
        outputs = traced_once(x, f"{key} {'x' if rotating else 'x R'}",
                              lambda: self.__dict__["_packed_group"].traced_outputs(x, rotating))
        return None if outputs is None else outputs[self.__dict__["_group_index"]]

    def forward_rotated(self, x: Tensor) -> Tensor:
        """The layer on an input already in its rotated basis (x R), for the packed forms: what a fused prologue feeds.
        Eager inference keeps the route per input signature (``kernels/plans.py``)."""
        if plans.usable():
            return plans_of(self).get(("linear", *input_signature(x)), lambda: packed_forward.linear_plan(
                x, self.indices, self.codebooks, self.codebook_scales, self.bias, self.code_bits, self.in_features))(x)
        return _packed_paths().linear(x, self.indices, self.codebooks, self.codebook_scales, self.bias, self.code_bits,
                                      self.in_features)

    def gated_forward(self, gate: Tensor, up: Tensor) -> Tensor | None:
        """``self(silu(gate) * up)`` in one kernel where the one-token binned route applies, else None (``fused_glu``)."""
        if self.decoded is not None:
            return None
        return kernels.gated_linear_forward(gate, up, self.codebooks, self.bias, self.code_bins, self._route_store())

    def _route_store(self) -> dict:
        """The routes this layer was given: (token count, device, dtype, options) -> route; never saved."""
        return self.__dict__.setdefault("_routes", {})

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
            f"codebooks={self.codebook_dtype}, bias={self.bias is not None}{_rotation_repr(self)}"
        )


def _decoded_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + b with a weight kept decoded (``keep_decoded``), computed in the weight's dtype, returned in x's."""
    out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return out if bias is None else out + bias.to(out.dtype)


def _rotation_repr(module: _Codes) -> str:
    return "" if module.rotation_block is None else f", rotation=hadamard({module.rotation_block})"


class RPQEmbedding(_Codes, nn.Embedding):
    """An embedding table stored as codebooks + codes along the rows; a lookup decodes only the rows asked for.

    It subclasses nn.Embedding (without a ``weight``) so that model-specific embedding subclasses,
    whose forward ends in ``super().forward(ids)`` (OPT's learned positions), can be rebuilt on top
    of it by :func:`rpq_embedding_class`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        num_codebooks: int,
        codebook_size: int = 256,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
        codebook_dtype: str | None = None,
        rotation_block: int | None = None,
    ) -> None:
        nn.Module.__init__(self)  # nn.Embedding.__init__ would allocate the dense table
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        _register_codes(
            self, embedding_dim, num_embeddings, num_codebooks, codebook_size, device, dtype, "embedding_dim", codebook_dtype,
            rotation_block, embedding_dim,
        )

    def dequantize(self) -> Tensor:
        """The dense (num_embeddings, embedding_dim) table these codes stand for (E = E' R^T in float32 where rotated)."""
        if self.rotation_block is None:
            return decode(self.codebook_values(), self.codes(), EMBEDDING)
        return self.unrotate_rows(decode(self.codebook_values(torch.float32), self.codes(), EMBEDDING))

    def unrotate_rows(self, rows: Tensor) -> Tensor:
        """Decoded rows of E' = E R back to rows of E (unchanged without a rotation)."""
        if self.rotation_block is None:
            return rows
        return _packed_paths().unrotate(rows, self.signs(rows.dtype), self.rotation_block)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's argument name
        if self.decoded is not None:
            return self.decoded[input].to(self.value_dtype)
        if not self.native:
            if plans.usable():
                return plans_of(self).get(("rows", *input_signature(input), self.value_dtype), lambda: self._rows_plan(input))(input)
            rows = _packed_paths().embedding_rows(
                input, self.indices, self.codebooks, self.codebook_scales, self.code_bits, self.columns, self.value_dtype
            )
            return self.unrotate_rows(rows)
        return kernels.embedding_forward(input, self.codebooks, self.indices).to(self.compute_dtype)

    def _rows_plan(self, ids: Tensor):
        """The lookup (rows decoded, then turned back with R^T) for ids shaped like ``ids``, worked out once."""
        dtype = self.value_dtype
        rows = packed_forward.embedding_rows_plan(ids, self.indices, self.codebooks, self.codebook_scales, self.code_bits,
                                                  self.columns, dtype)
        if self.rotation_block is None:
            return rows
        template = torch.empty(*ids.shape, self.embedding_dim, device=self.indices.device, dtype=dtype)
        unrotate = packed_forward.rotate_plan(template, self.signs(dtype), self.rotation_block, signs_first=False)
        return lambda ids: unrotate(rows(ids))

    def reset_parameters(self) -> None:
        """Nothing to reset: the codes come from a fitted checkpoint (nn.Embedding would touch ``weight``)."""

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, num_codebooks={self.num_codebooks}, "
            f"codebook_size={self.codebook_size}, codebooks={self.codebook_dtype}{_rotation_repr(self)}"
        )


class RPQTiedHead(nn.Module):
    """An output projection tied to an RPQ embedding: logits = x E^T + b, one set of codes for both.

    The embedding is referenced, not registered, so the codes are saved once (under the embedding's
    name) and a ``.to()`` on the model moves them once.
    """

    def __init__(self, embedding: RPQEmbedding, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) if bias else None

    @property
    def embedding(self) -> RPQEmbedding:
        return self._embedding

    def tie_to(self, embedding: RPQEmbedding) -> None:
        """Point at another embedding module (after loading, the model's own)."""
        object.__setattr__(self, "_embedding", embedding)
        plans.invalidate_all()

    def dequantize(self) -> Tensor:
        return self._embedding.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        embedding = self._embedding
        if embedding.decoded is not None:
            return _decoded_product(x, embedding.decoded, self.bias)
        if not embedding.native:
            if plans.usable():
                return plans_of(self).get(input_signature(x), lambda: self._logits_plan(x))(x)
            return _packed_paths().tied_head(
                embedding.rotate_input(x), embedding.indices, embedding.codebooks, embedding.codebook_scales, self.bias,
                embedding.code_bits, embedding.num_embeddings,
            )
        return kernels.tied_head_forward(x, embedding.codebooks, embedding.indices, self.bias)

    def _logits_plan(self, x: Tensor):
        """Rotation, then the packed head, for hidden states shaped like ``x`` (x R has x's shape, dtype and device: all
        the head's plan reads), worked out once."""
        embedding = self._embedding
        rotate = (lambda x: x) if embedding.rotation_block is None else embedding.rotate_alone
        head = packed_forward.tied_head_plan(x, embedding.indices, embedding.codebooks, embedding.codebook_scales,
                                             self.bias, embedding.code_bits, embedding.num_embeddings)
        return lambda x: head(rotate(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to an RPQEmbedding"


class ScaledRowsLookup:
    """The forward of an embedding that multiplies every row by a constant ``embed_scale`` buffer (Gemma's
    families: ``super().forward(ids) * self.embed_scale.to(self.weight.dtype)``). That forward reads the dense
    ``weight`` an RPQ table does not hold; this one scales the decoded rows in the dtype they decode to. The
    scale comes from the plain ``scalar_embed_scale`` where the family keeps one: the buffer is not saved, and
    a table built on the meta device (loading) holds no value in it."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's argument name
        rows = RPQEmbedding.forward(self, input)
        scalar = getattr(self, "scalar_embed_scale", None)
        if scalar is None:
            return rows * self.embed_scale.to(rows.dtype)
        # the family's rounding (its float32 scale cast to the rows' dtype), as a Python number: nothing to copy
        # to the device on each call, so a CUDA graph can capture it
        return rows * torch.tensor(float(scalar)).to(rows.dtype).item()


_EMBEDDING_CLASSES: dict[type, type] = {nn.Embedding: RPQEmbedding}


def embedding_forward_reads_weight(cls: type) -> bool:
    """Whether a subclass of nn.Embedding reads ``self.weight`` in a forward of its own (the RPQ table has none);
    a forward whose source cannot be read is assumed to."""
    return any(source is None or "self.weight" in source for source in own_forward_sources(cls, (nn.Embedding, RPQEmbedding)))


def embedding_stand_in(table: nn.Embedding) -> type | None:
    """The mixin whose forward replaces that of ``table``'s class when it reads ``self.weight``; None when none
    does (a scaled table is told by its one-value ``embed_scale`` buffer)."""
    scale = getattr(table, "embed_scale", None)
    return ScaledRowsLookup if isinstance(scale, Tensor) and scale.numel() == 1 else None


def embedding_needs_dense(table: nn.Embedding) -> bool:
    """Whether ``table``'s own forward reads ``self.weight`` and no stand-in replaces it: it must stay dense."""
    return embedding_forward_reads_weight(type(table)) and embedding_stand_in(table) is None


def rpq_embedding_class(original: type, stand_in: type | None = None) -> type:
    """The RPQ version of an nn.Embedding subclass: the subclass's forward over RPQEmbedding's lookup.

    ``class RPQ<Name>(<Name>, RPQEmbedding)`` puts RPQEmbedding between the subclass and
    nn.Embedding in the method order, so the subclass's ``super().forward`` reaches the codes. A
    subclass whose forward reads ``self.weight`` gets ``stand_in``'s forward first in the order.
    """
    key = (original, stand_in) if stand_in else original
    if key not in _EMBEDDING_CLASSES:
        bases = (stand_in, original, RPQEmbedding) if stand_in else (original, RPQEmbedding)
        _EMBEDDING_CLASSES[key] = type(f"RPQ{original.__name__}", bases, {})
    return _EMBEDDING_CLASSES[key]


def build_rpq_embedding(
    original: nn.Embedding,
    num_codebooks: int,
    codebook_size: int,
    device=None,
    dtype=None,
    codebook_dtype: str | None = None,
    rotation_block: int | None = None,
) -> RPQEmbedding:
    """An empty RPQ module of the same class family as ``original``, keeping its extra state.

    Extra attributes (OPT's position ``offset``) and buffers (a scale) of a subclass are carried
    over; its ``weight`` is not.
    """
    stand_in = embedding_stand_in(original) if embedding_forward_reads_weight(type(original)) else None
    cls = rpq_embedding_class(type(original), stand_in)
    module = cls.__new__(cls)
    RPQEmbedding.__init__(
        module,
        original.num_embeddings,
        original.embedding_dim,
        num_codebooks,
        codebook_size,
        padding_idx=original.padding_idx,
        device=device,
        dtype=dtype,
        codebook_dtype=codebook_dtype,
        rotation_block=rotation_block,
    )
    for name, value in vars(original).items():
        if not name.startswith("_") and name not in vars(module):
            setattr(module, name, value)
    for name, buffer in original._buffers.items():
        module.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
    module.train(original.training)
    return module


# Kinds of layer, as recorded per layer in the checkpoint config.
KIND_LINEAR = "linear"
KIND_CONV1D = "conv1d"
KIND_EMBEDDING = "embedding"
KIND_TIED_HEAD = "tied_head"


def build_rpq_module(
    original: nn.Module,
    kind: str,
    num_codebooks: int,
    codebook_size: int,
    tied_embedding: RPQEmbedding | None = None,
    codebook_dtype: str | None = None,
    rotation_block: int | None = None,
) -> nn.Module:
    """An RPQ module shaped like ``original`` (same device and dtype), codes not yet filled in.

    ``codebook_dtype``: how its codebooks are stored ("int8", a float dtype name; None: the model's dtype).
    ``rotation_block``: the Hadamard block of its input rotation (None: not rotated; a tied head uses its
    embedding's).

    Used both when converting (the fit fills the codes) and when loading a checkpoint (the loader
    fills them, on the meta device first). A bias is copied when ``original`` holds real values.
    """
    if kind == KIND_TIED_HEAD:
        if tied_embedding is None:
            raise ValueError("a tied head needs the RPQEmbedding it is tied to")
        bias = getattr(original, "bias", None)
        module = RPQTiedHead(
            tied_embedding, bias=bias is not None, device=tied_embedding.indices.device, dtype=tied_embedding.value_dtype
        )
    elif kind == KIND_EMBEDDING:
        weight = original.weight
        return build_rpq_embedding(
            original, num_codebooks, codebook_size, device=weight.device, dtype=weight.dtype, codebook_dtype=codebook_dtype,
            rotation_block=rotation_block,
        )
    elif kind in (KIND_LINEAR, KIND_CONV1D):
        weight, bias = original.weight, original.bias
        in_features, out_features = (original.nx, original.nf) if kind == KIND_CONV1D else (original.in_features, original.out_features)
        module = RPQLinear(
            in_features, out_features, num_codebooks, codebook_size, bias=bias is not None, device=weight.device,
            dtype=weight.dtype, codebook_dtype=codebook_dtype, rotation_block=rotation_block,
        )
    else:
        raise ValueError(f"unknown RPQ layer kind {kind!r}")
    if bias is not None and bias.device.type != "meta" and module.bias.device.type != "meta":
        with torch.no_grad():
            module.bias.copy_(bias)
    return module


