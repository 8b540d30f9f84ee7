"""``podsrl export``: a LoRA run's checkpoint as a merged transformers directory and as a peft adapter,
and the two agree (the merged model's logits are the adapter model's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lora_helpers import adapter_model
from peft import PeftModel
from transformers import AutoModelForCausalLM

from launcher.cli import main
from launcher.tiny import build_tiny_model
from learner.checkpoint import load_latest, save_checkpoint
from learner.lora import apply_lora, trainable
from learner.model import load_model
from protocol.config import load_config

LORA = ["learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.target_modules=['q_proj','v_proj','down_proj']"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run directory with a checkpoint of version 5 (random adapter, as after training)."""
    run = tmp_path_factory.mktemp("lora_run")
    cfg = load_config(None, [f"run.dir={run}", *LORA])
    build_tiny_model(cfg, cfg.model_dir, alphabet="abcdefghijkl:")
    model, _ = adapter_model(cfg, load_model(cfg.model_dir, CPU))
    save_checkpoint(cfg, model, torch.optim.AdamW(trainable(model)), 5, 0, step=5)
    return run


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 4, 2, 7, 3, 5, 9]])).logits


def test_export_merge_and_adapter_round_trip(lora_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(lora_run), "--merge", str(tmp_path / "merged")]) == 0
    assert main(["export", str(lora_run), "--adapter", str(tmp_path / "adapter")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run / "model", dtype=torch.float32).eval()
    plain = logits(base)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    want = logits(adapted)
    torch.testing.assert_close(logits(merged), want, atol=2e-5, rtol=0)
    assert (want - plain).abs().max() > 1e-2, "the adapter should change the logits"
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_export_refuses_what_it_cannot_write(lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "taken").mkdir()
    assert main(["export", str(lora_run), "--merge", str(tmp_path / "taken")]) == 2
    assert main(["export", str(tmp_path), "--adapter", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo group, as every learner has (checkpoints load with broadcast_from_rank0)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_lora_checkpoint_resumes_at_its_version_with_its_adapter(lora_run: Path, one_rank: None) -> None:
    cfg = load_config(None, [f"run.dir={lora_run}", *LORA])
    torch.manual_seed(1)
    model = apply_lora(load_model(cfg.model_dir, CPU), cfg.learner.lora)
    assert load_latest(cfg, model, torch.optim.AdamW(trainable(model)), 0).version == 5
    saved = PeftModel.from_pretrained(load_model(cfg.model_dir, CPU), lora_run / "checkpoints" / "v000005" / "adapter")
    got, want = dict(model.named_parameters()), dict(saved.named_parameters())
    assert all(torch.equal(got[k], want[k]) for k in got if ".lora_" in k)
    full = load_config(None, [f"run.dir={lora_run}"])  # the same run without LoRA: refused, naming the fix
    plain = load_model(cfg.model_dir, CPU)
    with pytest.raises(ValueError, match="learner.lora"):
        load_latest(full, plain, torch.optim.AdamW(plain.parameters()), 0)
