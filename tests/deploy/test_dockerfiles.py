"""The two Dockerfiles: known instructions, CPU torch pinned, non-root, exec-form entrypoint."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import tomllib

from tests.deploy import deployfiles as df

IMAGES = sorted(df.IMAGES)


def install_script_torch_spec() -> str:
    """The torch pin of scripts/install.sh, the one supported way to install fedlora."""
    text = (df.REPO / "scripts" / "install.sh").read_text()
    match = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-([^}]+)\}"', text)
    assert match, "scripts/install.sh no longer sets TORCH_SPEC"
    return match.group(1)


@pytest.mark.parametrize("image", IMAGES)
def test_every_instruction_is_a_dockerfile_instruction_and_from_comes_first(image: str) -> None:
    parsed = df.dockerfile(image)
    unknown = [i for i in parsed.instructions if i.keyword not in df.DOCKERFILE_INSTRUCTIONS]
    assert unknown == []
    assert parsed.instructions[0].keyword == "FROM"
    assert len(parsed.stages) == 2  # build, runtime
    for stage in parsed.stages:
        assert stage[0].args.split()[0] == "python:3.11-slim"


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_is_fedlora_in_exec_form(image: str) -> None:
    parsed = df.dockerfile(image)
    entrypoints = parsed.all("ENTRYPOINT", parsed.final)
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0].args) == ["fedlora"]
    cmd = parsed.exec_form("CMD")  # raises on shell form
    assert cmd and cmd[0] in {"coordinator", "device"}


@pytest.mark.parametrize("image", IMAGES)
def test_cpu_torch_is_pinned_before_fedlora_is_installed(image: str) -> None:
    parsed = df.dockerfile(image)
    runs = [parsed.expand(i.args) for i in parsed.all("RUN", parsed.stages[0])]
    torch_at = next(n for n, r in enumerate(runs) if "torch" in r and "pip install" in r)
    fedlora_at = next(n for n, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    # assert: torch first, from the CPU index, at the install script's pin
    assert torch_at < fedlora_at
    tokens = shlex.split(runs[torch_at])
    assert tokens[tokens.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert install_script_torch_spec() in tokens
    assert "torch==2.13.0" in tokens


@pytest.mark.parametrize("image", IMAGES)
def test_the_runtime_stage_runs_as_a_numeric_non_root_user(image: str) -> None:
    parsed = df.dockerfile(image)
    final = parsed.final
    users = parsed.all("USER", final)
    assert users, "no USER: the container would run as root"
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes can check runAsNonRoot"
    entry = parsed.all("ENTRYPOINT", final)[0]
    assert final.index(users[-1]) < final.index(entry)
    assert f"useradd --system --uid {uid} " in " ".join(i.args for i in parsed.all("RUN", final))


@pytest.mark.parametrize("image", IMAGES)
def test_runtime_environment(image: str) -> None:
    env = df.dockerfile(image).env()
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert env["PATH"].startswith("/opt/fedlora/bin:")


def test_the_coordinator_checks_its_grpc_ports_and_the_device_has_no_healthcheck() -> None:
    coordinator = df.dockerfile("fedlora-coordinator")
    (check,) = coordinator.all("HEALTHCHECK", coordinator.final)
    assert " CMD " in f" {check.args} "
    assert "(p, p + 2)" in check.args  # Fleet API and fedlora services, not the Control API
    assert coordinator.env()["FEDLORA_HEALTHCHECK_PORT"] == "9092"
    exposed = {p for i in coordinator.all("EXPOSE", coordinator.final) for p in i.args.split()}
    assert exposed == {"9092", "9094"}  # P+1, the Control API, listens on loopback only
    device = df.dockerfile("fedlora-device")
    # A device serves no port: an explicit NONE, the restart policy is its health check.
    assert [i.args for i in device.all("HEALTHCHECK", device.final)] == ["NONE"]
    assert device.all("EXPOSE", device.final) == []


@pytest.mark.parametrize("image", IMAGES)
def test_the_base_model_is_baked_into_the_image_as_the_runtime_user(image: str) -> None:
    parsed = df.dockerfile(image)
    final = parsed.final
    bake = next(i for i in final if i.keyword == "RUN" and "default_model_path" in i.args)
    assert final.index(parsed.all("USER", final)[-1]) < final.index(bake)
    assert parsed.env()["FEDLORA_CACHE"] in parsed.chowned_dirs()
    assert "OMP_NUM_THREADS=1" in bake.args  # one thread: the same model in both images


@pytest.mark.parametrize("image", IMAGES)
def test_the_build_context_holds_what_pip_install_needs_and_no_more(image: str) -> None:
    parsed = df.dockerfile(image)
    patterns = df.dockerignore_patterns(parsed.path.with_name(parsed.path.name + ".dockerignore"))
    pyproject = tomllib.loads((df.REPO / "pyproject.toml").read_text())
    packages = {
        p.split(".")[0].rstrip("*")
        for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    # fedlora/server, fedlora/client, fedlora/privacy link to the top-level folders: the
    # folders themselves must be in the context for the links to resolve in the build
    packages |= {
        link.resolve().relative_to(df.REPO).as_posix()
        for link in (df.REPO / "fedlora").iterdir()
        if link.is_symlink()
    }
    copied = set()
    for ins in parsed.all("COPY", parsed.stages[0]):
        *sources, _dest = shlex.split(ins.args)
        copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    # assert: every installed package and the files pyproject names are copied, and sent
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for source in copied:
        assert (df.REPO / source).exists(), source
        assert not df.dockerignored(patterns, source), f"{source} is left out of the context"
        assert not df.dockerignored(patterns, f"{source}/__init__.py") or "." in source
    for junk in (".venv", "runs/default", "build/lib", "tests", "fedlora/__pycache__/x.pyc"):
        assert df.dockerignored(patterns, junk), f"{junk} would be sent to the builder"
