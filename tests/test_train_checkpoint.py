"""Checkpointer: a damaged newest checkpoint is set aside with a warning and the previous one
restores (data iterator included); when none restores, an error and nothing set aside; the
keep policy. Real Orbax, the tiny model's state, the
real loader on the demo corpus."""
import os
import shutil

import jax
import numpy as np
import pytest
from absl import logging

from configs import ettin_tiny
from data_pipeline import loader
from ettin_jax import checkpoint, demo, sharding, train



@pytest.fixture(scope="module")
def setup():
    config = demo.apply_demo(ettin_tiny.get_config("mlm"))
    config.data.num_workers = 0
    config.train.xla_options = "xla_backend_optimization_level=0"
    return config, train.make_setup(config, sharding.make_mesh(config.mesh))


def save_steps(directory, config, s, steps, **keep):
    """Saves a changing state at `steps`; returns {step: (params as numpy, iterator state)}."""
    ckpt = checkpoint.Checkpointer(directory, **keep)
    it = loader.make_train_iterator(config)
    state = s.init_state()
    saved = {}
    for step in steps:
        state = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x, state)
        next(it)
        ckpt.save(step, params=state["params"], opt_state=state["opt_state"],
                  meta={"step": step, "tokens_seen": step * 100}, data_iterator=it, config=config)
        saved[step] = (jax.tree.map(np.asarray, state["params"]), it.get_state())
    ckpt.wait()
    ckpt.close()
    return saved


def test_damaged_latest_falls_back_to_previous(tmp_path, setup, caplog):
    config, s = setup
    saved = save_steps(str(tmp_path), config, s, (2, 4), keep_last=3)
    scramble(tmp_path / "checkpoints" / "4" / "params")

    it = loader.make_train_iterator(config)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last=3)
    with caplog.at_level(logging.WARNING):
        params, _, meta = ckpt.restore_latest(abstract_params=s.abstract_state["params"],
                                              abstract_opt_state=s.abstract_state["opt_state"],
                                              data_iterator=it)
    ckpt.close()
    assert meta == {"step": 2, "tokens_seen": 200}
    assert any("cannot be restored" in r.getMessage() and "checkpoints/4" in r.getMessage()
               for r in caplog.records)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4.damaged"]
    want_params, want_iterator = saved[2]
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert it.get_state() == want_iterator


def test_init_from_skips_a_newest_checkpoint_whose_metadata_is_damaged(tmp_path, setup, caplog):
    """A new phase starting from a run whose newest checkpoint cannot even be described
    (damaged tree metadata) starts from the one before, with a warning, and leaves the source
    run untouched."""
    config, s = setup
    saved = save_steps(str(tmp_path), config, s, (2, 4), keep_last=3)
    (tmp_path / "checkpoints" / "4" / "params" / "_METADATA").write_text("{garbage")
    with caplog.at_level(logging.WARNING):
        params, opt_state, meta = checkpoint.restore_from_run(
            str(tmp_path), abstract_params=s.abstract_state["params"],
            abstract_opt_state=s.abstract_state["opt_state"])
    assert meta == {"step": 2, "tokens_seen": 200}
    assert opt_state is not None
    assert any("init_from" in r.getMessage() and "step 4" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(saved[2][0])):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    (tmp_path / "checkpoints" / "2" / "params" / "_METADATA").write_text("{garbage")
    with pytest.raises(FileNotFoundError, match=r"no readable checkpoint \(step 4: .*; step 2: "):
        checkpoint.restore_from_run(str(tmp_path), abstract_params=s.abstract_state["params"])


def scramble(directory):
    """Garbage of the same size in every file below `directory`."""
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "r+b") as f:
                f.write(os.urandom(os.path.getsize(path)))


def test_when_no_checkpoint_restores_nothing_is_set_aside(tmp_path, setup):
    """Every checkpoint failing is rarely damage to each (a changed data setting, a storage
    fault): the error names them all, and they stay where they are for the next attempt."""
    config, s = setup
    save_steps(str(tmp_path), config, s, (2, 4), keep_last=3)
    for step in ("2", "4"):
        scramble(tmp_path / "checkpoints" / step / "params")
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last=3)
    with pytest.raises(checkpoint.RestoreError, match=r"none of its checkpoints restores \(step 4: "
                       r".*; step 2: .*\)\. Nothing was set aside.*data\.num_workers"):
        ckpt.restore_latest(abstract_params=s.abstract_state["params"],
                            abstract_opt_state=s.abstract_state["opt_state"],
                            data_iterator=loader.make_train_iterator(config))
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_keeps_the_last_k_and_every_mth(tmp_path, setup):
    config, s = setup
    save_steps(str(tmp_path), config, s, (2, 4, 6, 8, 10), keep_last=2, keep_every_steps=4)
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints")) == [4, 8, 10]


def test_a_smaller_keep_last_on_resume_keeps_only_what_the_policy_says(tmp_path, setup):
    """A run without checkpoints kept for good, resumed keeping 1: 10 and 20 go (they were
    recorded as kept for good, as in a workdir from before the record, and stayed forever)."""
    config, s = setup
    save_steps(str(tmp_path), config, s, (10, 20, 30), keep_last=3)
    save_steps(str(tmp_path), config, s, (40, 50), keep_last=1)
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints")) == [50]


def test_a_workdir_from_before_the_record_keeps_its_older_checkpoints(tmp_path, setup):
    """A workdir from before kept_for_good.json: checkpoints older than the newest keep_last
    survived only because they were kept for good, so the first start records them and a
    later save with a smaller keep_last deletes none of them."""
    config, s = setup
    save_steps(str(tmp_path), config, s, (2, 4, 6, 8), keep_last=4)
    os.remove(tmp_path / checkpoint.KEPT_FOR_GOOD_NAME)      # as before the record
    save_steps(str(tmp_path), config, s, (10,), keep_last=2)
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints")) == [2, 4, 8, 10]


@pytest.mark.parametrize("text", ["", "{}", '{"steps": 4}'])
def test_an_unreadable_kept_for_good_record_is_named(tmp_path, text):
    (tmp_path / checkpoint.KEPT_FOR_GOOD_NAME).write_text(text)
    with pytest.raises(ValueError, match=r"kept_for_good\.json: not a readable record of the "
                                         r"checkpoints kept for good"):
        checkpoint.Checkpointer(str(tmp_path), keep_last=3)


def test_changed_config_is_an_error_not_damage(tmp_path, setup):
    """Resuming with a model of another width names the tensors and leaves the checkpoint be."""
    config, s = setup
    save_steps(str(tmp_path), config, s, (2,), keep_last=3)
    wider = demo.apply_demo(ettin_tiny.get_config("mlm"))
    wider.model.hidden_size = 32
    other = train.make_setup(wider, s.mesh)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last=3)
    with pytest.raises(ValueError, match=r"layers/0/qkv: \(64, 3, 4, 16\) in the checkpoint"):
        ckpt.restore_latest(abstract_params=other.abstract_state["params"],
                            abstract_opt_state=other.abstract_state["opt_state"],
                            data_iterator=loader.make_train_iterator(config))
    ckpt.close()
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_a_disk_without_room_for_a_checkpoint_is_warned_about_at_the_start(tmp_path, setup,
                                                                            caplog):
    """A rerun on a disk still full trained a whole checkpoint interval before its first save
    failed. The Checkpointer compares the disk's free bytes with the state's at the start."""
    free = shutil.disk_usage(tmp_path).free
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup[1].abstract_state))
    assert 0 < state_bytes < free
    too_big = {"x": jax.ShapeDtypeStruct((free // 4 + 1,), np.float32)}   # a byte over free
    assert checkpoint.warn_if_no_room(str(tmp_path), too_big)
    assert not checkpoint.warn_if_no_room(
        str(tmp_path), {"x": jax.ShapeDtypeStruct((free // 8,), np.float32)})
    caplog.clear()
    checkpoint.Checkpointer(str(tmp_path / "a"), keep_last=1, abstract_state=too_big).close()
    checkpoint.Checkpointer(str(tmp_path / "b"), keep_last=1,
                            abstract_state=setup[1].abstract_state).close()
    warned = [r.getMessage() for r in caplog.records if "GB free" in r.getMessage()]
    assert len(warned) == 1 and "/a/checkpoints has" in warned[0], warned
