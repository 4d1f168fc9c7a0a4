"""FFF as the registry sees it: its checkpoint section, tensor checks, inspect line, summary table, FF spans."""

from __future__ import annotations

from ..core.errors import UserError
from ..core.methods import Headers, Method, register
from .blocks import timing_spans
from .quantizer import QUANT_METHOD, FFFConfig, FFFHfQuantizer


def check_tensors(section: dict, headers: Headers) -> None:
    """Every tree the section names has its router and leaf tensors in the shapes it records."""
    for name, spec in section.get("blocks", {}).items():
        _check_tree(name, spec, headers)


def _check_tree(name: str, spec: dict, headers: Headers) -> None:
    leaves, hidden, width = 2 ** spec["depth"], spec["hidden"], spec["leaf_width"]
    expected = {"router_weight": [leaves - 1, hidden], "leaf_in": [leaves, width, hidden], "leaf_out": [leaves, width, hidden]}
    if spec.get("gated"):
        expected["leaf_gate"] = [leaves, width, hidden]
    if not 1 <= spec.get("leaves_per_token", 1) <= leaves:
        raise UserError(f"'{name}' runs {spec['leaves_per_token']} leaves per token but has {leaves}: the config is corrupt")
    shared = spec.get("shared_width", 0)
    if shared:
        expected |= {"shared_in": [shared, hidden], "shared_out": [shared, hidden]}
        if spec.get("gated"):
            expected["shared_gate"] = [shared, hidden]
    for tensor, shape in expected.items():
        key = f"{name}.{tensor}"
        if key not in headers:
            raise UserError(f"the checkpoint has no tensor '{key}': the weights file is incomplete")
        if headers[key][0] != shape:
            raise UserError(f"'{key}' has shape {headers[key][0]}, the config says {shape}")


def describe(section: dict) -> str:
    return f"FFF, {len(section['blocks'])} FF blocks as trees (depth {section['settings']['depth']})"


def summary_table(summary: dict):
    from .summary import DistillSummary, table_rows, totals_lines

    loaded = DistillSummary.from_json(summary)
    return (*table_rows(loaded), totals_lines(loaded))


register(Method(
    name=QUANT_METHOD, title="FFF distillation", config_class=FFFConfig, quantizer_class=FFFHfQuantizer,
    check_tensors=check_tensors, describe=describe, summary_table=summary_table, ff_timing_spans=timing_spans,
    command=f"{__package__}.command", rank=10,
))
