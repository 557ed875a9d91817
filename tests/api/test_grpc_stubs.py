"""The committed gRPC stubs are what grpcio-tools makes of the vendored .proto, with the one change
the service makes (a descriptor pool of their own). `REGENERATE=1 pytest tests/api/test_grpc_stubs.py`
writes them anew after the .proto changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = Path("service/api/grpc")
STUBS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
# Each stub module's messages go into a pool of their own, not protobuf's default one, where
# tritonclient.grpc and kserve put the same names: the service, or a test, may import them all.
OWN_POOL = ("_descriptor_pool.Default().AddSerializedFile", "_descriptor_pool.DescriptorPool().AddSerializedFile")


def generate(out: Path) -> None:
    (out / PACKAGE).mkdir(parents=True)
    shutil.copy(ROOT / PACKAGE / "inference.proto", out / PACKAGE)
    flags = ["--python_out=.", "--pyi_out=.", "--grpc_python_out=."]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *flags, str(PACKAGE / "inference.proto")],
        cwd=out,
        check=True,
        timeout=60,
    )
    module = out / PACKAGE / "inference_pb2.py"
    text = module.read_text()
    assert text.count(OWN_POOL[0]) == 1, "the generated module no longer adds its file to the default pool"
    module.write_text(text.replace(*OWN_POOL))


def test_the_committed_stubs_are_generated_from_the_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in STUBS:
        made = (tmp_path / PACKAGE / name).read_text()
        if os.environ.get("REGENERATE"):
            (ROOT / PACKAGE / name).write_text(made)
        assert (ROOT / PACKAGE / name).read_text() == made, f"{name} drifted: REGENERATE=1 pytest {__file__}"


def test_the_proto_names_its_sources() -> None:
    text = (ROOT / PACKAGE / "inference.proto").read_text()
    assert "github.com/kserve/kserve" in text
    assert "github.com/triton-inference-server/common" in text
