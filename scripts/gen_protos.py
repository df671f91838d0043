"""Generate the Python code of fedlora's protos; ``--check`` fails if the committed code is stale.

Driven by ``[tool.fedlora.protos]`` in ``pyproject.toml``: every ``.proto`` under
``source`` is compiled with ``grpc_tools.protoc`` (``-I source``) into ``out``,
giving ``X_pb2.py`` (messages), ``X_pb2.pyi`` (their types) and ``X_pb2_grpc.py``
(stubs and servicers). The package path follows the proto package, so
``protos/fedlora/v1/*.proto`` lands in ``fedlora/v1/``. The generated code is
committed and needs only ``grpcio`` and ``protobuf`` at runtime; this script
needs ``grpcio-tools`` (the ``dev`` extra pins the version whose output is
committed, since another protoc writes different code).

    python scripts/gen_protos.py           # regenerate in place
    python scripts/gen_protos.py --check   # exit 1 naming every stale file (CI, tests)
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtoError(Exception):
    """A configuration or compilation problem, printed as one line."""


def load_config(root: Path = ROOT) -> tuple[Path, Path]:
    """``(source, out)`` from ``[tool.fedlora.protos]``, as absolute paths."""
    pyproject = root / "pyproject.toml"
    try:
        table = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["fedlora"]["protos"]
        source, out = root / table["source"], root / table["out"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as err:
        raise ProtoError(
            f"{pyproject} needs a [tool.fedlora.protos] table with 'source' and 'out' ({err!r})"
        ) from None
    if not source.is_dir():
        raise ProtoError(f"proto source directory {source} does not exist")
    return source, out


def proto_files(source: Path) -> list[Path]:
    files = sorted(source.rglob("*.proto"))
    if not files:
        raise ProtoError(f"no .proto files under {source}")
    return files


def generate(source: Path, out: Path) -> list[Path]:
    """Compile every proto under ``source`` into ``out``; return the files written."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ProtoError(
            "grpcio-tools is not installed: pip install -e '.[dev]' (it pins the version "
            "the committed code was generated with)"
        ) from None
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = proto_files(source)
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{source}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(source)) for p in protos),
    ]
    # The proto paths are given relative to -I so that imports between protos and the
    # generated module names follow the package (fedlora/v1/x.proto → fedlora.v1.x_pb2).
    if protoc.main(args) != 0:
        raise ProtoError(f"protoc failed on {source} (its message is above)")
    return [out / rel for rel in expected_outputs(source)]


def expected_outputs(source: Path) -> list[Path]:
    """The generated files' paths relative to ``out``, one set per proto."""
    outs = []
    for proto in proto_files(source):
        stem = proto.relative_to(source).with_suffix("")
        outs += [stem.with_name(stem.name + suffix) for suffix in GENERATED_SUFFIXES]
    return sorted(outs)


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def check(source: Path, out: Path) -> list[str]:
    """Regenerate into a temp dir; one line per committed file that differs, is missing or is
    left over from a proto that no longer exists."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="fedlora-protos-") as tmp:
        fresh = Path(tmp)
        generate(source, fresh)
        wanted = expected_outputs(source)
        for rel in wanted:
            committed = out / rel
            if not committed.is_file():
                problems.append(f"{_show(committed)} is missing")
            elif not filecmp.cmp(fresh / rel, committed, shallow=False):
                problems.append(f"{_show(committed)} is stale")
        package_dirs = {(out / rel).parent for rel in wanted}
        for directory in sorted(package_dirs):
            for path in sorted(directory.iterdir()):
                rel = path.relative_to(out)
                if path.name.endswith(GENERATED_SUFFIXES) and rel not in wanted:
                    problems.append(f"{_show(path)} has no .proto any more")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail if the committed code differs",
    )
    args = parser.parse_args(argv)
    try:
        source, out = load_config()
        if args.check:
            problems = check(source, out)
            if problems:
                print(
                    "gen_protos: generated code does not match the protos: "
                    + "; ".join(problems)
                    + ". Run `python scripts/gen_protos.py` and commit the result.",
                    file=sys.stderr,
                )
                return 1
            print(f"gen_protos: generated code under {out} is up to date")
            return 0
        written = generate(source, out)
    except ProtoError as err:
        print(f"gen_protos: error: {err}", file=sys.stderr)
        return 2
    print(f"gen_protos: wrote {len(written)} files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
