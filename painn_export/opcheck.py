"""Checks an ONNX graph against TensorRT's ONNX-parser operator facts.

The facts (which operators the parser supports, with which element types,
and the restrictions that can be read off a graph) ship with the package:
``painn_export/data/tensorrt-10.1-operators.json``, made by
``scripts/make_trt_operator_facts.py`` from onnx-tensorrt's
``docs/operators.md`` of that release (source and version are recorded in
the file). An ``operators.md`` of another release can be given instead; it is
parsed the same way. For every node the check reads:

- the operator is listed as supported, with its input and output element types;
- "``reduction`` is not supported" -> the node has no ``reduction`` (or "none");
- "``X`` must be an initializer" / "a constant tensor" -> that input is constant;
- "only the first output" -> no other output is used;

plus, for ``ScatterElements`` with a reduction (TensorRT's plugin), int64
indices and no bfloat16. Restrictions the facts do not capture are reported
as unchecked rather than silently passed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FACTS_FILE = "tensorrt-10.1-operators.json"

# ONNX TensorProto element types as the table names them.
_ELEM_NAMES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FP16",
    11: "DOUBLE",
    16: "BF16",
}
_BOOL_OUTPUT = frozenset(
    {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "IsNaN", "IsInf", "Not", "And", "Or", "Xor"}
)
# Inputs that are shapes, int64 by the ONNX spec whatever the data's type: the
# types column constrains the data (ConstantOfShape's "INF64" in the 10.1
# table is a typo, and a shape input cannot be anything but int64).
_SHAPE_INPUTS = {"ConstantOfShape": (0,), "Reshape": (1,), "Expand": (1,), "Tile": (1,)}
# Input positions of inputs that restrictions name, by operator (opset >= 13 layout).
_NAMED_INPUTS = {
    "axes": {
        "ReduceSum": 1,
        "ReduceL2": 1,
        "ReduceMean": 1,
        "ReduceMax": 1,
        "ReduceMin": 1,
        "ReduceProd": 1,
        "ReduceL1": 1,
        "ReduceLogSum": 1,
        "ReduceLogSumExp": 1,
        "ReduceSumSquare": 1,
        "Squeeze": 1,
        "Unsqueeze": 1,
        "Slice": 3,
    },
}


@dataclass(frozen=True)
class OperatorRule:
    name: str
    supported: bool
    types: frozenset[str]
    no_reduction: bool = False  # a `reduction` attribute other than "none" is rejected
    constant_inputs: tuple[str, ...] = ()  # named inputs that must be initializers
    first_output_only: bool = False
    other_limits: bool = False  # restrictions beyond the ones above (not checked)

    def as_facts(self) -> dict:
        facts: dict = {"supported": self.supported, "types": sorted(self.types)}
        for key in ("no_reduction", "first_output_only", "other_limits"):
            if getattr(self, key):
                facts[key] = True
        if self.constant_inputs:
            facts["constant_inputs"] = list(self.constant_inputs)
        return facts


@dataclass
class OpCheckReport:
    violations: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    operators: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def _rule_from_row(name: str, supported: bool, types: frozenset[str], text: str) -> OperatorRule:
    """Read the restrictions a graph can show from a row's free text."""
    no_reduction = bool(re.search(r"`reduction` is not supported", text))
    constant = tuple(re.findall(r"`(\w+)` must be (?:an initializer|a constant tensor)", text))
    first_only = "Only the first output" in text
    rest = re.sub(
        r"`reduction` is not supported|`\w+` must be (?:an initializer|a constant tensor)", "", text
    )
    rest = re.sub(r"Only the first output `?\w*`? is supported\.?", "", rest)
    return OperatorRule(name, supported, types, no_reduction, constant, first_only, bool(rest.strip(" .")))


def parse_operator_table(path: str | Path) -> tuple[dict[str, OperatorRule], tuple[int, int]]:
    """Rules by operator name, and the supported opset range, from onnx-tensorrt's operators.md."""
    text = Path(path).read_text()
    match = re.search(r"opset (\d+) to opset (\d+)", text)
    if not match:
        raise ValueError(f"{path}: no 'opset N to opset M' range found; is it onnx-tensorrt's operators.md?")
    rules: dict[str, OperatorRule] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[A-Z][A-Za-z0-9]*", cells[0]) or cells[1] not in ("Y", "N"):
            continue
        types = (
            frozenset(t.strip() for t in cells[2].split(",") if t.strip()) if len(cells) > 2 else frozenset()
        )
        rules[cells[0]] = _rule_from_row(cells[0], cells[1] == "Y", types, cells[3] if len(cells) > 3 else "")
    if not rules:
        raise ValueError(f"{path}: no operator rows found")
    return rules, (int(match.group(1)), int(match.group(2)))


def default_facts_path() -> Path:
    from importlib.resources import files

    return Path(str(files("painn_export") / "data" / FACTS_FILE))


def load_facts(path: str | Path | None = None) -> tuple[dict[str, OperatorRule], tuple[int, int], str]:
    """Rules, opset range and a one-line source.

    From a facts JSON (default: the bundled one) or an onnx-tensorrt operators.md.
    """
    path = Path(path) if path is not None else default_facts_path()
    if path.suffix == ".md":
        rules, opsets = parse_operator_table(path)
        return rules, opsets, str(path)
    try:
        data = json.loads(path.read_text())
        rules = {
            name: OperatorRule(
                name,
                bool(f["supported"]),
                frozenset(f.get("types", ())),
                bool(f.get("no_reduction", False)),
                tuple(f.get("constant_inputs", ())),
                bool(f.get("first_output_only", False)),
                bool(f.get("other_limits", False)),
            )
            for name, f in data["operators"].items()
        }
        opsets = tuple(data["opset_range"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a TensorRT operator facts file ({type(exc).__name__}: {exc})") from exc
    return rules, (int(opsets[0]), int(opsets[1])), f"{data.get('source', '?')} ({data.get('tensorrt', '?')})"


def check_model(model, facts: str | Path | None = None) -> OpCheckReport:
    """Check an ``onnx.ModelProto`` (or a path to one) against TensorRT's operator facts.

    ``facts``: a facts JSON or an onnx-tensorrt ``operators.md``; default the
    bundled TensorRT 10.1 facts.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    rules, (lo, hi), _ = load_facts(facts)
    report = OpCheckReport()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not lo <= opset.version <= hi:
            report.violations.append(f"opset {opset.version} outside TensorRT's {lo}..{hi}")

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
    consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}

    for node in graph.node:
        label = f"{node.op_type} node {node.name or '?'}"
        report.operators[node.op_type] = report.operators.get(node.op_type, 0) + 1
        rule = rules.get(node.op_type)
        if node.domain not in ("", "ai.onnx"):
            report.violations.append(f"{label}: custom domain {node.domain!r}")
            continue
        if rule is None or not rule.supported:
            report.violations.append(f"{label}: not supported by TensorRT's ONNX parser")
            continue
        # The types column constrains data tensors; comparisons always output BOOL.
        shapes = _SHAPE_INPUTS.get(node.op_type, ())
        data = [name for k, name in enumerate(node.input) if k not in shapes]
        checked = data if node.op_type in _BOOL_OUTPUT else [*data, *node.output]
        for name in checked:
            if not name or name not in types or types[name] == 0:
                continue
            elem = _ELEM_NAMES.get(types[name], f"type{types[name]}")
            if rule.types and elem not in rule.types:
                report.violations.append(f"{label}: tensor {name} is {elem}, supported: {sorted(rule.types)}")
        _check_restrictions(node, rule, constants, consumed, types, label, report)
    return report


def _attr(node, name):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _check_restrictions(node, rule: OperatorRule, constants, consumed, types, label, report) -> None:
    reduction = _attr(node, "reduction")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if rule.no_reduction and reduction not in (None, "none"):
        report.violations.append(f"{label}: reduction={reduction!r}, which TensorRT does not support here")
    for arg in rule.constant_inputs:
        position = _NAMED_INPUTS.get(arg, {}).get(node.op_type)
        if position is None:
            report.unchecked.append(f"{label}: restriction on `{arg}`")
        elif len(node.input) > position and node.input[position] and node.input[position] not in constants:
            report.violations.append(f"{label}: input `{arg}` ({node.input[position]}) is not an initializer")
    if rule.first_output_only and any(o in consumed for o in node.output[1:] if o):
        report.violations.append(f"{label}: uses an output other than the first")
    if rule.other_limits:
        report.unchecked.append(f"{label}: further restrictions in TensorRT's operator table")
    if node.op_type == "ScatterElements" and reduction not in (None, "none"):
        # TensorRT's ScatterElements plugin: int64 indices, no bfloat16.
        indices, updates = node.input[1], node.input[2]
        if types.get(indices) != 7:
            report.violations.append(
                f"{label}: plugin needs int64 indices, got {_ELEM_NAMES.get(types.get(indices))}"
            )
        if types.get(updates) == 16:
            report.violations.append(f"{label}: plugin does not support bfloat16")
