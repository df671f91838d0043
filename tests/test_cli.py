"""The CLI's contract for bad input: one line, non-zero exit, no traceback, no RUN_DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedlora.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedlora: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"training": {"epochs": 3}}))
    out = tmp_path / "run"
    code, err = _run(capsys, "simulate", "--out", str(out), "--config", str(cfg))
    _assert_one_line_error(code, err, "unknown config key training.'epochs'")
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, "simulate", "--out", str(out), "--data", str(tmp_path / "nope.jsonl"))
    _assert_one_line_error(code, err, "does not exist")
    assert not out.exists()


def test_data_file_without_device_field(tmp_path, capsys):
    data = tmp_path / "fleet.jsonl"
    data.write_text('{"device": "a", "text": "hello"}\n{"text": "no device here"}\n')
    out = tmp_path / "run"
    code, err = _run(capsys, "simulate", "--out", str(out), "--data", str(data))
    _assert_one_line_error(code, err, "device")
    assert "line 2" in err
    assert not out.exists()


def test_model_path_that_is_not_a_causal_lm(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    model_dir = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(model_dir)
    capsys.readouterr()  # drop save_pretrained's progress output
    out = tmp_path / "run"
    code, err = _run(capsys, "simulate", "--out", str(out), "--model", str(model_dir))
    _assert_one_line_error(code, err, "causal")
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_epsilon(tmp_path, capsys, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--out", str(out), f"--epsilon={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--epsilon: must be > 0" in err and "Traceback" not in err
    assert not out.exists()


def test_epsilon_zero_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"privacy": {"epsilon": 0}}))
    code, err = _run(capsys, "simulate", "--out", str(tmp_path / "run"), "--config", str(cfg))
    _assert_one_line_error(code, err, "privacy.epsilon must be a positive number")


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run(capsys, "simulate", "--out", str(out))
    _assert_one_line_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_flags_override_config_file(tmp_path):
    from fedlora.cli import build_parser, resolve_simulate_config

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"training": {"rounds": 9}, "seed": 4}))
    args = build_parser().parse_args(
        ["simulate", "--out", "x", "--config", str(cfg), "--rounds", "2", "--devices", "5"]
    )
    resolved = resolve_simulate_config(args)
    assert resolved.training.rounds == 2 and resolved.seed == 4
    assert resolved.fleet.num_devices == 5 and resolved.fleet.devices_per_round == 5


def test_help_explains_every_flag():
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    for flag in (
        "--out",
        "--config",
        "--devices",
        "--rounds",
        "--data",
        "--model",
        "--epsilon",
        "--delta",
        "--seed",
        "--no-secagg",
    ):
        assert flag in out


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    """The installed console script, as a user runs it."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlora.cli",
            "simulate",
            "--out",
            str(out),
            "--data",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3  # DataError
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_export_profile(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"export": {"profile": "toaster"}}))
    out = tmp_path / "run"
    code, err = _run(capsys, "simulate", "--out", str(out), "--config", str(cfg))
    _assert_one_line_error(code, err, "unknown profile 'toaster'")
    assert not out.exists()


def test_resume_refuses_config_flags(tmp_path, capsys):
    code, err = _run(capsys, "simulate", "--resume", str(tmp_path), "--rounds", "3")
    assert code != 0 and err.count("\n") == 1
    assert "--rounds cannot be combined with --resume" in err


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    code, err = _run(capsys, "simulate", "--resume", str(tmp_path / "nothing"))
    assert code != 0 and err.count("\n") == 1 and "holds no run to resume" in err


def test_resume_of_a_run_that_is_still_alive(tmp_path, capsys):
    import os
    import platform

    from fedlora.config import FedloraConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(FedloraConfig().to_dict()))
    status = {"status": "running", "pid": os.getpid(), "host": platform.node()}
    (run / "run.json").write_text(json.dumps(status))
    code, err = _run(capsys, "simulate", "--resume", str(run))
    assert code != 0 and err.count("\n") == 1 and f"still running (pid {os.getpid()})" in err


def test_out_or_resume_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["simulate"])
    assert "one of the arguments --out --resume is required" in capsys.readouterr().err


def test_run_resume_refuses_a_config(capsys):
    code, err = _run(
        capsys, "run", "--coordinator", "127.0.0.1:1", "--insecure", "--resume", "r1",
        "--config", "x.json",
    )  # fmt: skip
    assert code != 0 and "--config cannot be combined with --resume" in err
