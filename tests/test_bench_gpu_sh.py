"""bench/gpu.sh --dry_run: the script parses and prints every command it would run."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sh_dry_run_prints_every_command(tmp_path):
    out = subprocess.run(["bash", "bench/gpu.sh", "--dry_run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, OUT=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    for name in ("ours_150m_mlm", "ours_1b_mlm", "ours_150m_clm", "peer_150m_mlm", "peer_1b_mlm",
                 "peer_150m_clm", "attention", "startup", "memory_1b"):
        assert f"[{name}," in out.stdout, (name, out.stdout)
    assert "dry run: nothing ran" in out.stdout
    assert not (tmp_path / "gpubench" / "train_step.jsonl").exists()   # nothing ran
