"""sweeps/pull.py: fetch an exported LoRA from a sweep folder, checking the manifest's sha256."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ray import tune
from safetensors import safe_open
from safetensors.torch import save_file

from sweeps.export import export_sweep
from sweeps.pull import PullError, main, pull
from sweeps.results import TrialRecord, TrialRow
from sweeps.spec import load_spec
from sweeps.trainable import LORA_DIFFUSERS, LORA_KOHYA, SAMPLES_FILE, TRIAL_INFO, save_grid

ROOT = Path(__file__).resolve().parents[2]


def _record(tmp: Path, trial_id: str, lr: float, rank: int, score: float) -> TrialRecord:
    """A finished trial as Ray Tune reports it: a Result whose best checkpoint holds the trainable's files."""
    ckpt = tmp / trial_id / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    params = {"learning_rate": lr, "rank": rank}
    metrics = {"step": 10, "clip_score": score}
    save_file({"lora_unet_x.lora_down.weight": torch.full((rank, 4), lr)}, str(ckpt / LORA_KOHYA),
              metadata={"ss_network_dim": str(rank)})
    save_file({"unet.x.lora_A.weight": torch.full((rank, 4), lr)}, str(ckpt / LORA_DIFFUSERS))
    save_grid(torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy(), ckpt / SAMPLES_FILE)
    (ckpt / TRIAL_INFO).write_text(json.dumps({"params": params, "metrics": metrics}))
    result = tune.Result(metrics=metrics, checkpoint=None, error=None, path=str(tmp / trial_id),
                         best_checkpoints=[(tune.Checkpoint.from_directory(ckpt), metrics)])
    row = TrialRow(trial_id, params, score, "complete", 10, 1.0)
    return TrialRecord(row, result)


@pytest.fixture
def exported(tmp_path):
    spec = load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path / 'runs'}", "export.top_k=2",
                                                       "objective={metric: clip_score, mode: max}"])
    records = [_record(tmp_path / "trials", "aaa", 1e-3, 2, 30.0), _record(tmp_path / "trials", "bbb", 2e-3, 4, 50.0),
               _record(tmp_path / "trials", "ccc", 3e-4, 8, 10.0)]
    export_sweep(spec, records)
    return spec.output_dir


def test_pull_winner_kohya_by_default(exported, tmp_path, capsys):
    dst = tmp_path / "out" / "winner.safetensors"
    dst.parent.mkdir()
    assert main([str(exported), "--to", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "trial bbb" in out and "rank=4" in out and "clip_score=50" in out
    assert out.strip().splitlines()[-1] == f"pulled: {dst}"
    assert dst.read_bytes() == (exported / "export" / "rank1" / LORA_KOHYA).read_bytes()
    assert json.loads(dst.with_suffix(".json").read_text())["params"] == {"learning_rate": 2e-3, "rank": 4}


def test_pull_rank_two_in_diffusers_layout_into_a_folder(exported, tmp_path):
    path, info = pull(str(exported), tmp_path, rank=2, fmt="diffusers")
    assert path == tmp_path / "demo-rank2-diffusers.safetensors"
    assert info["trial_id"] == "aaa"
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["unet.x.lora_A.weight"]


def test_pull_refuses_a_file_that_does_not_match_the_manifest(exported, tmp_path, capsys):
    target = exported / "export" / "rank1" / LORA_KOHYA
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    dst = tmp_path / "w.safetensors"
    assert main([str(exported), "--to", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "does not match the manifest" in err and str(target) in err
    assert not dst.exists()


def test_pull_clear_errors(exported, tmp_path):
    with pytest.raises(PullError, match="--rank 3 was not exported"):
        pull(str(exported), tmp_path / "x.safetensors", rank=3)
    with pytest.raises(FileNotFoundError, match="no export manifest"):
        pull(str(tmp_path), tmp_path / "x.safetensors")
    with pytest.raises(PullError, match="expected wandb:ENTITY/PROJECT"):
        pull("wandb:just-a-name", tmp_path / "x.safetensors")


def test_pull_from_wandb_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "pull.py"), "wandb:me/lorasweep/lora-demo:best",
                           "--to", str(tmp_path / "w.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "set WANDB_API_KEY" in proc.stderr and "wandb sync" in proc.stderr
