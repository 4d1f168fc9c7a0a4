"""RPQ as the registry sees it: its checkpoint section, tensor checks, inspect line, summary table, workspaces."""

from __future__ import annotations

from ..core.errors import UserError
from ..core.methods import Headers, Method, register
from .kernels.layout import INT8, code_bits, packed_width
from .quantizer import FORMAT_VERSION, QUANT_METHOD, RPQConfig, RPQHfQuantizer


def check_tensors(section: dict, headers: Headers) -> None:
    """Every RPQ layer the section names has its codebooks, codes (int8 scales, rotation signs) in the shapes it records."""
    version = section.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"the checkpoint's RPQ format version {version} is newer than this model-compress reads ({FORMAT_VERSION}): "
            "upgrade model-compress"
        )
    for layer, spec in section.get("layers", {}).items():
        if spec.get("kind") != "tied_head":  # a tied head reads its embedding's codes
            _check_codes(layer, spec, headers)
            _check_rotation(layer, spec, headers)


def _check_rotation(layer: str, spec: dict, headers: Headers) -> None:
    """A rotated layer's signs: one bit per input feature (per table column) packed into uint8, the width its
    block divides."""
    block = spec.get("rotation_block")
    if block is None:
        return
    name = f"{layer}.rotation_signs"
    if name not in headers:
        raise UserError(f"the checkpoint has no tensor '{name}': the layer's rotation data is missing")
    shape, dtype = headers[name]
    width = spec["shape"][1] if "shape" in spec else 8 * shape[0]
    if dtype != "U8" or len(shape) != 1 or shape[0] * 8 != width:
        raise UserError(f"'{name}' is {dtype} {shape}; the config needs U8 [{width // 8}] (one sign bit per input feature)")
    if not isinstance(block, int) or block < 8 or block & (block - 1) or width % block:
        raise UserError(f"'{layer}': rotation block {block} is not a power of two of at least 8 dividing the width {width}")


def _check_codes(layer: str, spec: dict, headers: Headers) -> None:
    num_codebooks, codebook_size = spec["num_codebooks"], spec["codebook_size"]
    int8 = spec.get("codebook_dtype") == INT8
    tensors = ("codebooks", "indices", "codebook_scales") if int8 else ("codebooks", "indices")
    for tensor in tensors:
        if f"{layer}.{tensor}" not in headers:
            raise UserError(f"the checkpoint has no tensor '{layer}.{tensor}': the weights file is incomplete")
    codebooks_shape, codebooks_dtype = headers[f"{layer}.codebooks"]
    indices_shape, indices_dtype = headers[f"{layer}.indices"]
    if codebooks_shape[:2] != [num_codebooks, codebook_size] or indices_shape[0] != num_codebooks:
        raise UserError(f"'{layer}': tensor shapes disagree with the config (M={num_codebooks}, K={codebook_size})")
    if indices_dtype != "U8":
        raise UserError(f"'{layer}.indices' is {indices_dtype}, expected U8 (codes packed at {code_bits(codebook_size)} bits)")
    if "shape" in spec:
        columns = spec["shape"][0] if spec["kind"] == "embedding" else spec["shape"][1]
        width = packed_width(columns, code_bits(codebook_size))
        if indices_shape != [num_codebooks, width]:
            raise UserError(f"'{layer}.indices' has shape {indices_shape}, the config says {[num_codebooks, width]}")
    if int8 and (codebooks_dtype != "I8" or headers[f"{layer}.codebook_scales"][0] != [num_codebooks]):
        raise UserError(f"'{layer}': int8 codebooks need I8 codebooks and one scale per codebook")


def describe(section: dict) -> str:
    settings = f"--bits {section['bits']:g}" if section.get("bits") is not None else f"M={section['num_codebooks']} K={section['codebook_size']}"
    rotated = sum(1 for spec in section["layers"].values() if spec.get("rotation_block"))
    rotation = f", {rotated} with a Hadamard input rotation" if rotated else ""
    return f"RPQ {settings}, {len(section['layers'])} RPQ layers{rotation}, {len(section['dense'])} dense"


def summary_table(summary: dict):
    from .summary import ConversionSummary, table_rows, totals_lines

    loaded = ConversionSummary.from_json(summary)
    return (*table_rows(loaded), totals_lines(loaded))


def release_workspaces() -> None:
    from .kernels.forward import release_workspaces as release

    release()


def decode_weights(model, dtype) -> int:
    """Every RPQ Linear and table keeps its weight decoded in ``dtype`` (``_Codes.keep_decoded``); the bytes added."""
    from .layers.modules import RPQEmbedding, RPQLinear

    return sum(module.keep_decoded(dtype) for module in model.modules() if isinstance(module, (RPQLinear, RPQEmbedding)))


def full_logits(model, on: bool) -> None:
    from .head_index.figures import full_logits as switch

    switch(model, on)


def fixed_shortlists(model, on: bool) -> dict | None:
    from .head_index.figures import fixed_shortlists as switch

    return switch(model, on)


def head_figures(model, windows, device) -> dict | None:
    from .head_index.figures import head_figures as figures

    return figures(model, windows, device)


register(Method(
    name=QUANT_METHOD, title="RPQ conversion", config_class=RPQConfig, quantizer_class=RPQHfQuantizer,
    check_tensors=check_tensors, describe=describe, summary_table=summary_table, release_workspaces=release_workspaces,
    decode_weights=decode_weights, full_logits=full_logits, fixed_shortlists=fixed_shortlists,
    head_figures=head_figures,
    command=f"{__package__}.command", rank=0,
))
