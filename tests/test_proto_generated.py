"""The committed generated code is exactly what `make proto` produces from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("refund_gate", "admin")
GENERATED = tuple(f"{p}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *(str(ROOT / f"proto/refundgate/v1/{p}.proto") for p in PROTOS),
        ],
        check=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "refundgate/v1" / name).read_bytes() != (ROOT / "refundgate/v1" / name).read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
