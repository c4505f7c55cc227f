"""Checks an ONNX graph against TensorRT's ONNX-parser operator table.

The table is onnx-tensorrt's ``docs/operators.md`` (a copy of the 10.1 one
lives in ``shared/reference/``). For every node it checks: the operator is
listed as supported; its input and output element types are among the
listed types; and the listed restrictions that can be read off a graph:

- "``reduction`` is not supported" -> the node has no ``reduction`` (or "none");
- "``X`` must be an initializer" / "must be a constant tensor" -> that input
  comes from an initializer or a Constant node;
- "Only the first output ``Y`` is supported" -> no other output is used;

plus the ScatterElements plugin's own rules for ``reduction`` != none: int64
indices of the same rank as the updates. Restrictions it cannot read are
reported as unchecked rather than silently passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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
    restrictions: str


@dataclass
class OpCheckReport:
    violations: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    operators: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def parse_operator_table(path: str | Path) -> tuple[dict[str, OperatorRule], tuple[int, int]]:
    """Rules by operator name, and the supported opset range, from operators.md."""
    text = Path(path).read_text()
    match = re.search(r"opset (\d+) to opset (\d+)", text)
    if not match:
        raise ValueError(f"{path}: no 'opset N to opset M' range found")
    rules: dict[str, OperatorRule] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[A-Z][A-Za-z0-9]*", cells[0]) or cells[1] not in ("Y", "N"):
            continue
        types = (
            frozenset(t.strip() for t in cells[2].split(",") if t.strip()) if len(cells) > 2 else frozenset()
        )
        restrictions = cells[3] if len(cells) > 3 else ""
        rules[cells[0]] = OperatorRule(cells[0], cells[1] == "Y", types, restrictions)
    if not rules:
        raise ValueError(f"{path}: no operator rows found")
    return rules, (int(match.group(1)), int(match.group(2)))


def check_model(model, table: str | Path) -> OpCheckReport:
    """Check an ``onnx.ModelProto`` (or a path to one) against the table at ``table``."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    rules, (lo, hi) = parse_operator_table(table)
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
        checked = [*node.input] if node.op_type in _BOOL_OUTPUT else [*node.input, *node.output]
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


def _check_restrictions(node, rule, constants, consumed, types, label, report) -> None:
    text = rule.restrictions
    reduction = _attr(node, "reduction")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if re.search(r"`reduction` is not supported", text) and reduction not in (None, "none"):
        report.violations.append(f"{label}: reduction={reduction!r}, which TensorRT does not support here")
    for arg in re.findall(r"`(\w+)` must be (?:an initializer|a constant tensor)", text):
        position = _NAMED_INPUTS.get(arg, {}).get(node.op_type)
        if position is None:
            report.unchecked.append(f"{label}: restriction on `{arg}`")
        elif len(node.input) > position and node.input[position] and node.input[position] not in constants:
            report.violations.append(f"{label}: input `{arg}` ({node.input[position]}) is not an initializer")
    if "Only the first output" in text and any(o in consumed for o in node.output[1:] if o):
        report.violations.append(f"{label}: uses an output other than the first")
    if node.op_type == "ScatterElements" and reduction not in (None, "none"):
        # The ScatterElements plugin: int64 indices, same rank (and shape) as updates.
        indices, updates = node.input[1], node.input[2]
        if types.get(indices) != 7:
            report.violations.append(
                f"{label}: plugin needs int64 indices, got {_ELEM_NAMES.get(types.get(indices))}"
            )
        if types.get(updates) == 16:
            report.violations.append(f"{label}: plugin does not support bfloat16")
