import subprocess
import sys

from fedlora import privacy


def test_privacy_imports_no_torch_and_no_flower():
    code = (
        "import sys, fedlora.privacy, fedlora.privacy.report, fedlora.privacy.calibrate, "
        "fedlora.privacy.noise, fedlora.privacy.calibrate_ddg, fedlora.privacy.accountants.ddg; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'opacus'}))"
    )

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert out.stdout.strip() == "[]"


def test_public_names():
    for name in (
        "DPSGDEvent",
        "PrivacyLedger",
        "Accountant",
        "PRVAccountant",
        "RDPAccountant",
        "get_accountant",
        "epsilon_for",
        "epsilon_after",
        "calibrate_noise_multiplier",
        "build_report",
        "write_report",
        "RandomSource",
        "SecureRandom",
        "SeededRandom",
        "DDGEvent",
        "PrivacyEvent",
        "event_from_dict",
        "DDGAccountant",
        "epsilon_for_device",
        "calibrate_ddg_noise",
        "ddg_noise_multiplier",
    ):
        assert name in privacy.__all__
        assert getattr(privacy, name) is not None
