"""The app guard: only fedlora's own code-free bundle passes; anything else is refused."""

from __future__ import annotations

import io
import sys
import zipfile

import pytest

from fedlora.appguard import COMPONENTS, ForeignAppError, check_fab, task_command
from fedlora.server.control import app_pyproject, build_fab


def _fab(files: dict[str, bytes]) -> bytes:
    """A bundle built the way `flwr build` builds one (Flower's own builder and manifest)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(files)[0]


def _pyproject(**components: str) -> bytes:
    text = app_pyproject("0.1.0")
    for kind, ref in components.items():
        text = text.replace(f'{kind} = "{COMPONENTS[kind]}"', f'{kind} = "{ref}"')
    return text.encode()


def test_fedloras_own_bundle_passes():
    check_fab(build_fab())


def test_a_bundle_that_carries_code_is_refused_even_if_it_names_our_apps():
    # Flower puts the bundle's directory first on sys.path: a client/app.py in it would
    # shadow the installed one.
    fab = _fab({"pyproject.toml": _pyproject(), "client/app.py": b"import os\n"})
    with pytest.raises(ForeignAppError, match=r"client/app\.py"):
        check_fab(fab)


@pytest.mark.parametrize(
    "components",
    [
        {"clientapp": "evil:app"},
        {"serverapp": "fedlora.server.app:other"},
        {"clientapp": "fedlora.client.app:app2"},
    ],
)
def test_a_bundle_naming_other_components_is_refused(components):
    with pytest.raises(ForeignAppError, match="components"):
        check_fab(_fab({"pyproject.toml": _pyproject(**components)}))


def test_a_bundle_with_dependencies_or_another_publisher_is_refused():
    deps = _pyproject().replace(b"dependencies = []", b'dependencies = ["evil==1"]')
    with pytest.raises(ForeignAppError, match="install"):
        check_fab(_fab({"pyproject.toml": deps}))
    other = _pyproject().replace(b'publisher = "fedlora"', b'publisher = "mallory"')
    with pytest.raises(ForeignAppError, match="publisher"):
        check_fab(_fab({"pyproject.toml": other}))


def test_unreadable_and_hand_made_archives_are_refused():
    with pytest.raises(ForeignAppError, match="archive"):
        check_fab(b"not a zip")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # no manifest, a data file, a directory entry
        z.writestr("pyproject.toml", _pyproject())
        z.writestr("payload/", b"")
    with pytest.raises(ForeignAppError, match="payload/"):
        check_fab(buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(".info/CONTENT", b"")
    with pytest.raises(ForeignAppError, match="no pyproject"):
        check_fab(buf.getvalue())


def test_guarded_install_refuses_before_flower_unpacks_anything(tmp_path, monkeypatch):
    """The guard sits in front of Flower's install_from_fab: a foreign bundle never reaches it."""
    import importlib

    from fedlora import appguard

    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    installed: list[bytes] = []
    monkeypatch.setattr(module, "install_from_fab", lambda fab, **kw: installed.append(fab))
    appguard._guard(module)
    evil = _fab({"pyproject.toml": _pyproject(clientapp="evil:app"), "evil.py": b"x = 1\n"})
    with pytest.raises(ForeignAppError):
        module.install_from_fab(evil, skip_prompt=True)
    assert installed == []
    ours = build_fab()
    module.install_from_fab(ours, skip_prompt=True)
    assert installed == [ours]


def test_task_command_runs_this_python_with_the_guard(tmp_path):
    cmd = task_command("clientapp", "127.0.0.1:9", "tok", None)
    assert cmd[:4] == [sys.executable, "-m", "fedlora.appguard", "clientapp"]
    assert "--insecure" in cmd and cmd[cmd.index("--token") + 1] == "tok"
    ca = tmp_path / "ca.crt"
    assert task_command("serverapp", "127.0.0.1:9", "t", ca)[-2:] == [
        "--root-certificates",
        str(ca),
    ]


def test_resident_runner_gets_every_token_in_order_and_is_replaced_when_it_dies(tmp_path):
    from fedlora.appguard import ResidentRunner, resident_command

    assert resident_command("127.0.0.1:9", None)[:3] == [
        sys.executable,
        "-m",
        "fedlora.client.resident",
    ]
    # A stand-in runner that records the tokens it reads and dies after "crash".
    seen = tmp_path / "seen"
    script = (
        "import os, sys\n"
        "for line in sys.stdin:\n"
        f"    open({str(seen)!r}, 'a').write(f'{{os.getpid()}} {{line}}')\n"
        "    if line.strip() == 'crash':\n"
        "        os._exit(1)\n"
    )
    runner = ResidentRunner("127.0.0.1:9", None)
    runner.command = [sys.executable, "-c", script]

    runner.submit("a")
    runner.submit("crash")
    assert runner.proc is not None
    runner.proc.wait(timeout=30)  # it died handling "crash"
    runner.submit("b")
    runner.submit("c")
    runner.close()

    lines = [line.split() for line in seen.read_text().splitlines()]
    assert [token for _, token in lines] == ["a", "crash", "b", "c"]
    assert runner.starts == 2
    assert lines[0][0] == lines[1][0] != lines[2][0] == lines[3][0]  # one process per life


def test_resident_runner_refuses_to_run_serverapp_tasks():
    import threading

    from fedlora.appguard import serve_tasks

    with pytest.raises(ValueError, match="only ClientApp tasks"):
        serve_tasks("serverapp", "127.0.0.1:9", None, threading.Event(), resident=True)


def test_the_resident_runner_keeps_one_runs_caches_at_a_time():
    from fedlora.client.resident import RunCaches

    cleared: list[int] = []
    caches = RunCaches(clear=lambda: cleared.append(1))

    for run_id in (7, 7, 7, 8, 8, 7):
        caches.enter(run_id)

    assert caches.cleared == len(cleared) == 2  # 7 -> 8, 8 -> 7; never within a run
    assert caches.run_id == 7


def test_a_task_whose_supernode_is_unreachable_fails_in_bounded_time_and_the_runner_goes_on():
    """Flower's Runtime API client retries for ever: in the resident runner one SuperNode
    that stops answering would stall every later task of the device."""
    import socket
    import time

    from fedlora.client import resident

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"

    started = time.monotonic()
    status = resident.run_task(address, "token", None, give_up_s=1.0)
    elapsed = time.monotonic() - started

    assert status == "failed"
    assert elapsed < 20, f"gave up only after {elapsed:.1f}s"
    assert resident.API_GIVE_UP_S <= 60

    started = time.monotonic()
    done = resident.serve(address, None, ["a\n", "\n", "b\n"], give_up_s=1.0)
    assert done == 2  # both tokens ran (and failed); the blank line is no task
    assert time.monotonic() - started < 40
