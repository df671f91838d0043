"""An unsupported model is refused before training when the run would export GGUF."""

from __future__ import annotations

import json
import shutil

import pytest

from fedlora.config import FedloraConfig
from fedlora.errors import ModelError


def _copy_default(tmp_path, **config_changes):
    from fedlora.model import default_model_path

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    cfg_file = model / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(config_changes)
    cfg_file.write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize(
    ("change", "said", "loadable"),
    [
        ({"architectures": ["GPTNeoXForCausalLM"]}, "GGUF export supports", False),
        (
            # a Mistral with a real sliding window: llama.cpp's llama graph attends to everything
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 16,
                "max_position_embeddings": 512,
            },
            "sliding-window",
            True,
        ),
    ],
)
def test_simulate_refuses_a_model_gguf_cannot_hold_before_anything_runs(
    tmp_path, change, said, loadable
):
    from fedlora.simulate import prepare

    model = _copy_default(tmp_path, **change)
    cfg = FedloraConfig().replace(
        model={"path": str(model)}, export={"enabled": True, "formats": ["gguf-q8_0"]}
    )
    with pytest.raises(ModelError, match=said):
        prepare(cfg)
    if loadable:  # only GGUF refuses it
        prepare(cfg.replace(export={"enabled": True, "formats": ["int8"]}))


def test_the_default_model_passes_the_preflight():
    from fedlora.export.gguf import check_exportable
    from fedlora.model import default_model_path

    check_exportable(default_model_path())
