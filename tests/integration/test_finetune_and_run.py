"""The LoRA fixture and Run.checkpoint: a real PEFT fine-tune that sae_diff can see."""

from __future__ import annotations

import copy

import pytest
import torch

from aquin_nb import AquinError, Run, load_model, sae_diff
from aquin_nb.demo.finetune import finetune_lora


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora")
    return finetune_lora("tiny-gpt2", run_dir=run_dir, steps=60, progress=False)


def test_lora_fixture_writes_step_and_plain_hf_names(lora_checkpoint, tiny_hf):
    payload = torch.load(lora_checkpoint, weights_only=True)
    assert payload["step"] == 60
    model, _ = tiny_hf
    assert set(payload["state_dict"]) == set(model.state_dict())
    assert (lora_checkpoint.parent / "step_60.pt").is_file()
    changed = [
        k for k, v in payload["state_dict"].items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert changed and all("lora" not in key for key in payload["state_dict"])


def test_lora_fine_tune_moves_features_mostly_on_cooking_probes(lora_checkpoint):
    cooking = [
        "Instruction: How do I make soup?\nResponse:",
        "Chop the onions and simmer them in butter.",
        "Instruction: Give me a recipe for stew with leeks.\nResponse:",
        "Season the risotto with salt and fresh thyme.",
    ]
    code = [
        "Return a new list containing the items in sorted order.",
        "Raise ValueError if the argument is not a valid file name.",
        "Read and return at most size bytes from the underlying buffer.",
        "Create a new socket using the given address family and type.",
    ]
    on_cooking = sae_diff("tiny-gpt2", lora_checkpoint, prompts=cooking, progress=False)
    on_code = sae_diff("tiny-gpt2", lora_checkpoint, prompts=code, progress=False)
    print(
        f"mean |Δ| cooking {on_cooking.summary['mean_abs_delta']:.4f}, "
        f"code {on_code.summary['mean_abs_delta']:.4f}"
    )
    assert on_cooking.summary["mean_abs_delta"] > on_code.summary["mean_abs_delta"]
    assert sae_diff("tiny-gpt2", lora_checkpoint, progress=False).summary["n_changed"] > 0


def test_run_checkpoint_from_hf_peft_and_bridge(tmp_path, tiny_hf):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_hf
    expected = set(model.state_dict())
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    bridge = load_model("tiny-gpt2")
    for index, source in enumerate([model, peft_model, bridge]):
        path = Run(tmp_path / f"run{index}").checkpoint(source, step=index)
        state = torch.load(path, weights_only=True)["state_dict"]
        assert set(state) == expected, type(source).__name__
    merged = torch.load(tmp_path / "run1/checkpoints/checkpoint.pt", weights_only=True)
    assert not torch.equal(
        merged["state_dict"]["transformer.h.0.attn.c_attn.weight"],
        model.state_dict()["transformer.h.0.attn.c_attn.weight"],
    )
    bridged = torch.load(tmp_path / "run2/checkpoints/checkpoint.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(bridged["state_dict"][key], value)


def test_run_checkpoint_refuses_a_bad_step(tmp_path, tiny_hf):
    with pytest.raises(AquinError, match="step must be a non-negative integer"):
        Run(tmp_path).checkpoint(tiny_hf[0], step=-1)
    assert not (tmp_path / "checkpoints").exists()


def test_demo_writes_its_outputs(tmp_path, capsys):
    from aquin_nb.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "20", "-q"]) == 0
    out = capsys.readouterr().out
    assert "nChanged=" in out
    assert "[sae train]" in out and "[sae align]" in out
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == len(set(wrote)) == 5  # four JSON results and the report, once each
    assert "[model diff]" in out
    for name in ("model_diff.json", "sae_diff.json", "sae_train.json", "sae_align.json"):
        assert (tmp_path / "demo" / name).is_file()
    assert "aquin-card" in (tmp_path / "demo" / "report.html").read_text()
    assert (tmp_path / "demo" / "run" / "checkpoints" / "checkpoint.pt").is_file()
