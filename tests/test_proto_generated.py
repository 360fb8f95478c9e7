"""The committed generated code is exactly what `make proto` produces from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("refund_gate_pb2.py", "refund_gate_pb2.pyi", "refund_gate_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         str(ROOT / "proto/refundgate/v1/refund_gate.proto")],
        check=True,
    )
    stale = [name for name in GENERATED
             if (tmp_path / "refundgate/v1" / name).read_bytes()
             != (ROOT / "refundgate/v1" / name).read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
