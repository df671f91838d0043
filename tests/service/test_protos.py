"""The committed fedlora/v1 code is what scripts/gen_protos.py generates from protos/."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_protos.py"

NEEDS_GRPC_TOOLS = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools (the dev extra) generates the protos",
)


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@NEEDS_GRPC_TOOLS
def test_committed_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO
    )

    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


@NEEDS_GRPC_TOOLS
def test_check_names_stale_missing_and_leftover_files(tmp_path: Path) -> None:
    gen = _gen_protos()
    source, out = gen.load_config(REPO)
    copy = tmp_path / "out"
    shutil.copytree(out / "fedlora" / "v1", copy / "fedlora" / "v1")
    assert gen.check(source, copy) == []
    stub = copy / "fedlora" / "v1" / "model_service_pb2.pyi"
    stub.write_text(stub.read_text() + "# edited by hand\n")
    (copy / "fedlora" / "v1" / "privacy_service_pb2_grpc.py").unlink()
    (copy / "fedlora" / "v1" / "old_service_pb2.py").write_text("")

    problems = gen.check(source, copy)

    assert any(p.endswith("model_service_pb2.pyi is stale") for p in problems)
    assert any(p.endswith("privacy_service_pb2_grpc.py is missing") for p in problems)
    assert any(p.endswith("old_service_pb2.py has no .proto any more") for p in problems)
    assert len(problems) == 3


def test_generated_code_imports_without_grpc_tools() -> None:
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "from fedlora.v1 import model_service_pb2_grpc, privacy_service_pb2_grpc\n"
        "print(model_service_pb2_grpc.ModelServiceStub.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ModelServiceStub"
