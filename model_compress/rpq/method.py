"""RPQ as the registry sees it: its checkpoint section, tensor checks, inspect line, summary table, workspaces."""

from __future__ import annotations

from ..core.errors import UserError
from ..core.methods import Headers, Method, register
from .kernels.layout import INT8, code_bits, packed_width
from .quantizer import QUANT_METHOD, RPQConfig, RPQHfQuantizer


def check_tensors(section: dict, headers: Headers) -> None:
    """Every RPQ layer the section names has its codebooks, codes (and int8 scales) in the shapes it records."""
    for layer, spec in section.get("layers", {}).items():
        if spec.get("kind") != "tied_head":  # a tied head reads its embedding's codes
            _check_codes(layer, spec, headers)


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
    return f"RPQ {settings}, {len(section['layers'])} RPQ layers, {len(section['dense'])} dense"


def summary_table(summary: dict):
    from .summary import ConversionSummary, table_rows, totals_lines

    loaded = ConversionSummary.from_json(summary)
    return (*table_rows(loaded), totals_lines(loaded))


def release_workspaces() -> None:
    from .kernels.forward import release_workspaces as release

    release()


register(Method(
    name=QUANT_METHOD, title="RPQ conversion", config_class=RPQConfig, quantizer_class=RPQHfQuantizer,
    check_tensors=check_tensors, describe=describe, summary_table=summary_table, release_workspaces=release_workspaces,
    command=f"{__package__}.command", rank=0,
))
