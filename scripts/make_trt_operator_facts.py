"""Regenerate the TensorRT operator facts that ``painn_export.opcheck`` checks graphs against.

Reads onnx-tensorrt's ``docs/operators.md`` of one TensorRT release and
writes the facts a graph can be checked for (supported, element types,
restrictions as flags) as JSON. Only facts are kept, none of the table's
text. Usage:

    python scripts/make_trt_operator_facts.py path/to/operators.md \\
        --tensorrt "10.1 GA (onnx-tensorrt release/10.1, 2024-06-17)" \\
        -o painn_export/data/tensorrt-10.1-operators.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from painn_export.opcheck import parse_operator_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("operators_md", type=Path, help="onnx-tensorrt docs/operators.md")
    parser.add_argument("--tensorrt", required=True, help="which TensorRT release the table is from")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    rules, (lo, hi) = parse_operator_table(args.operators_md)
    facts = {
        "source": "onnx/onnx-tensorrt docs/operators.md",
        "tensorrt": args.tensorrt,
        "generated_by": "scripts/make_trt_operator_facts.py",
        "opset_range": [lo, hi],
        "operators": {name: rules[name].as_facts() for name in sorted(rules)},
    }
    args.output.write_text(json.dumps(facts, indent=1) + "\n")
    print(f"wrote {args.output}: {len(rules)} operators, opsets {lo}..{hi}")


if __name__ == "__main__":
    main()
