"""The metric writers without TensorFlow: `ettin_jax.writers.TensorBoardWriter`'s event files,
read back with TensorFlow's own reader, and `main.py` on a host where TensorFlow is absent."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_testlib
from test_train_resume import FLAGS as TRAIN_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(logdir):
    """{tag: {step: value}} of every event file in logdir, read by TensorFlow's reader."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    values = {}
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for value in event.summary.value:
                values.setdefault(value.tag, {})[event.step] = (
                    value.metadata.plugin_data.plugin_name, tf.make_ndarray(value.tensor))
    return values


def test_tensorboard_writer_files_read_back_with_tensorflow(tmp_path):
    from ettin_jax import writers  # pylint: disable=import-outside-toplevel
    writer = writers.TensorBoardWriter(str(tmp_path / "tb"))
    writer.write_scalars(1, {"loss": 10.25, "learning_rate": np.float32(3e-4)})
    writer.write_scalars(7, {"loss": 6.5})
    writer.write_texts(7, {"note": "phase ext ✓"})
    writer.close()
    got = read_events(tmp_path / "tb")
    assert set(got) == {"loss", "learning_rate", "note"}
    assert {step: (plugin, float(v)) for step, (plugin, v) in got["loss"].items()} == {
        1: ("scalars", 10.25), 7: ("scalars", 6.5)}
    plugin, lr = got["learning_rate"][1]
    assert plugin == "scalars" and lr == pytest.approx(3e-4)
    plugin, note = got["note"][7]
    assert plugin == "text" and note.item().decode("utf-8") == "phase ext ✓"
    with pytest.raises(NotImplementedError, match="histograms"):
        writer.write_histograms(1, {"w": np.zeros(3)})


def test_main_trains_and_writes_tensorboard_without_tensorflow(tmp_path):
    """A host without TensorFlow (the GPU image): TensorBoard's scalars equal metrics.jsonl."""
    blocker = tmp_path / "no_tensorflow"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('tensorflow', 'tensorflow_datasets'):\n"
        "    sys.modules[name] = None   # `import tensorflow` now raises ImportError\n")
    env = train_testlib.subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    flags = [flag for flag in TRAIN_FLAGS if "total_tokens" not in flag] + [
        "--config.demo.schedule.total_tokens=1024",                   # 2 steps of 8 x 64
        "--config.log.progress_every_secs=0.001"]                     # a progress note per step
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    events = read_events(workdir)
    assert [r["step"] for r in records] == [1, 2]
    for tag in ("loss", "steps_per_sec"):   # one series a tag (clu's progress writes none)
        assert {step: float(v) for step, (_, v) in events[tag].items()} == pytest.approx(
            {r["step"]: r[tag] for r in records}), tag
    assert "uptime" not in events


def test_a_profile_is_taken_once(tmp_path, monkeypatch):
    """config.log.profile_steps > 0: one profile of that many steps, not one an hour (clu's
    Profile default), however long the run."""
    from clu import profiler  # pylint: disable=import-outside-toplevel
    from ettin_jax import writers as writers_lib  # pylint: disable=import-outside-toplevel
    sessions = []
    monkeypatch.setattr(profiler, "start", lambda logdir: sessions.append(logdir))
    monkeypatch.setattr(profiler, "stop", lambda: None)
    config = train_testlib.config_from_flags(TRAIN_FLAGS + ["--config.log.profile_steps=3"])
    writers, _, hooks = writers_lib.run_writers(config, str(tmp_path), 0, 100_000)
    for step in range(1, 200):
        for hook in hooks:
            hook(step, t=step * 1800.0)      # half an hour a step
    writers.close()
    assert sessions == [str(tmp_path)]


def test_metrics_jsonl_is_strict_json(tmp_path):
    """A NaN or infinite value is written as null, so that strict parsers read every line."""
    from ettin_jax import writers  # pylint: disable=import-outside-toplevel
    path = tmp_path / "metrics.jsonl"
    writer = writers.JsonlWriter(str(path))
    writer.write_scalars(3, {"loss": np.float32(np.nan), "grad_norm": float("inf"),
                             "lr": np.float32(0.5), "data_fingerprints": ["a1"]})
    writer.close()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record == {"step": 3, "loss": None, "grad_norm": None, "lr": 0.5,
                      "data_fingerprints": ["a1"]}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_metrics_file():
    """A write() or flush() on a full disk raises a bare "[Errno 28] No space left on device",
    and a run ended with that line and nothing about where; /dev/full fails every write so."""
    from ettin_jax import cli, writers  # pylint: disable=import-outside-toplevel
    writer = writers.JsonlWriter("/dev/full")
    with pytest.raises(OSError) as raised:
        writer.write_scalars(3, {"loss": 1.5})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/dev/full"
    assert cli.error_line(raised.value) == (
        "error: [Errno 28] No space left on device: '/dev/full'")
    with pytest.raises(OSError) as raised, cli.naming_file("/dev/full"), \
            open("/dev/full", "wb", buffering=0) as f:
        f.write(b"x")
    assert raised.value.filename == "/dev/full"
