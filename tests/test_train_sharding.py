"""The sharded train step matches one device: meshes (data, fsdp, tensor) = (4,1,1), (1,4,1),
(2,1,2) on 4 CPU devices, and `main.py` as 2 processes x 2 devices over jax.distributed (gloo
collectives on localhost). Same batches from the real loader, gradient accumulation on (2 micro
batches per step), dropout on."""
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ettin_tiny
from data_pipeline import loader
from ettin_jax import checkpoint, demo, losses as losses_lib, schedules, sharding, train
from ettin_jax import workdir_lock

import train_testlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, ROWS, SEQ, ACCUM = 3, 8, 64, 2
OVERRIDES = {  # as --config.KEY=VALUE flags for main.py, and applied in-process below
    "demo.data.num_workers": 0, "demo.train.global_batch_size": ROWS, "demo.train.seq_len": SEQ,
    "demo.train.grad_accum_steps": ACCUM, "demo.schedule.total_tokens": STEPS * ROWS * SEQ,
    "demo.optimizer.lr_warmup_tokens": ROWS * SEQ, "demo.log.every_steps": 1,
    "demo.checkpoint.every_steps": 1, "demo.train.eval_batches": 0,
    "train.xla_options": "xla_backend_optimization_level=0",
}


def make_config(eval_documents: int = 5):
    config = ettin_tiny.get_config("mlm")
    for key, value in OVERRIDES.items():
        *sections, name = key.split(".")
        setattr(functools.reduce(getattr, sections, config), name, value)
    config.data.eval_documents = eval_documents
    return demo.apply_demo(config)


@functools.cache
def uneven_eval_documents() -> int:
    """Held-out documents whose two processes' shares make different numbers of eval batches.
    Searched: the demo corpus is Python's standard library, whose text differs by version."""
    for count in (5, 3, 7, 4, 6, 9, 11):
        if len(set(eval_batches_per_process(make_config(count)))) == 2:
            return count
    raise AssertionError("no held-out document count gives the processes uneven eval batches")


def one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def run_steps(config, mesh, global_batches):
    """Trains from the same init on `global_batches` ([micro, rows, ...] numpy dicts)."""
    setup = train.make_setup(config, mesh)
    state = setup.init_state()
    losses = []
    batch_sharding = sharding.batch_sharding(mesh, leading_axes=1)
    for step, batch in enumerate(global_batches):
        batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        lr = schedules.learning_rate(config, step * ROWS * SEQ)
        state, metrics = setup.train_step(state, batch, lr, step)
        losses.append(float(metrics.compute()["loss"]))
    return losses, state["params"]


def micro_batches(host_batches):
    """The global [micro, rows, ...] batch that hosts' row slices make (host 0's rows first in
    every micro batch), as sharding.host_batch_to_global lays them out."""
    return {k: np.concatenate([np.asarray(b[k]).reshape(ACCUM, -1, *np.shape(b[k])[1:])
                               for b in host_batches], axis=1) for k in host_batches[0]}


def assert_same(losses, params, ref_losses, ref_params):
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference():
    """Losses and final params on one device, on the batches that two hosts make (each host's
    loader slice, host 0's rows first): the 2-process run sees these, and the meshes too."""
    config = make_config(uneven_eval_documents())
    rows_for_step = schedules.rows_schedule(config)
    iterators = [loader.make_train_iterator(config, process_index=i, process_count=2,
                                            rows_for_step=rows_for_step) for i in range(2)]
    keys = losses_lib.BATCH_KEYS[config.objective]
    batches = [micro_batches([{k: next_batch[k] for k in keys} for next_batch in
                              (next(it) for it in iterators)]) for _ in range(STEPS)]
    losses, params = run_steps(config, one_device_mesh(), batches)
    assert all(np.isfinite(losses))
    return config, batches, losses, params


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1), (2, 1, 2)])
def test_mesh_matches_one_device(reference, shape):
    config, batches, ref_losses, ref_params = reference
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    losses, params = run_steps(config, mesh, batches)
    assert_same(losses, params, ref_losses, ref_params)
    # The parameters really are split as the rules say: the embedding [vocab, embed] over
    # tensor x fsdp, the MLP input [embed, 2, mlp] over fsdp x tensor.
    data, fsdp, tensor = shape
    assert params["tok_embeddings"].sharding.shard_shape((512, 64)) == (512 // tensor, 64 // fsdp)
    assert params["layers"][1]["mlp_in"].sharding.shard_shape((64, 2, 96)) == (64 // fsdp, 2, 96 // tensor)
    # qkv [hidden, 3, heads, head_dim]: the heads over tensor, each device whole heads.
    assert params["layers"][1]["qkv"].sharding.shard_shape((64, 3, 4, 16)) == (64 // fsdp, 3, 4 // tensor, 16)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_batches_per_process(config):
    """Eval batches of the two processes' shares of the held-out documents."""
    return [sum(1 for _ in loader.make_eval_iterator(config, process_index=i, process_count=2))
            for i in range(2)]


def test_two_processes_with_jax_distributed_match_one_device(tmp_path, reference):
    """... and evaluate at the last step although their shares of the held-out documents make
    different numbers of eval batches (evaluation.evaluate: the one out of documents steps on
    empty rows; else it would wait forever for the other's eval step)."""
    config, _, ref_losses, ref_params = reference
    workdir = tmp_path / "two_processes"
    port = free_port()
    env = train_testlib.subprocess_env(devices=2)
    counts = eval_batches_per_process(config)
    assert counts[0] != counts[1], counts     # (the demo corpus's held-out documents)
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [
        f"--config.data.eval_documents={config.data.eval_documents}",
        f"--config.demo.train.eval_batches={max(counts)}"]
    processes = []
    for process_id in range(2):
        with open(tmp_path / f"process{process_id}.log", "w") as log:   # the child keeps its own fd
            processes.append(subprocess.Popen(
                [sys.executable, "main.py", "--config=configs/ettin_tiny.py:mlm",
                 f"--workdir={workdir}", *flags, "--distributed",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={process_id}", "--cpu_collectives=gloo"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in processes]
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 devices (2 processes" in logs[0]

    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records]
    assert np.isfinite(records[-1]["eval_loss"]) and "eval_loss" not in records[0]
    setup = train.make_setup(config, one_device_mesh())
    params, _, meta = checkpoint.restore_from_run(str(workdir),
                                                  abstract_params=setup.abstract_state["params"])
    assert meta["step"] == STEPS
    assert_same(losses, params, ref_losses, ref_params)

    def again(timeout):
        """(exit codes, outputs) of the same two-process command once more."""
        port = free_port()
        processes = [subprocess.Popen(
            [sys.executable, "main.py", "--config=configs/ettin_tiny.py:mlm",
             f"--workdir={workdir}", *flags, "--distributed",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={process_id}", "--cpu_collectives=gloo"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for process_id in range(2)]
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
        return [p.returncode for p in processes], outputs

    # What process 0 alone does (read the tokens-per-step record, take the workdir's LOCK):
    # when it fails, the other process learns so and stops too, instead of waiting at the next
    # collective until a timeout that names something else.
    record = (workdir / "step_tokens.json").read_text()
    (workdir / "step_tokens.json").write_text("{cut short")
    codes, outputs = again(timeout=90)
    assert codes == [1, 1], outputs[1][-3000:]
    assert "step_tokens.json: not a readable tokens-per-step record" in outputs[0]
    assert "step_tokens.json: process 0 could not settle the run's tokens per step" in outputs[1]
    (workdir / "step_tokens.json").write_text(record)
    with workdir_lock.WorkdirLock(str(workdir)):
        codes, outputs = again(timeout=90)
    assert codes == [1, 1], outputs[1][-3000:]
    assert f"{workdir} is in use by another training process: pid {os.getpid()}" in outputs[0]
    assert f"{workdir}: process 0 could not lock it" in outputs[1]

    # Process 1 cannot restore its part of the newest checkpoint (its data iterator's state:
    # JSON, but not a state): both resume from the one before (one alone did, and both hung),
    # and end as the reference.
    assert checkpoint.saved_steps(str(workdir))[-2:] == [STEPS - 1, STEPS]
    (workdir / "checkpoints" / str(STEPS) / "data" / "process_1-of-2.json").write_text("{}")
    codes, outputs = again(timeout=300)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for output in outputs:
        assert f"resumed from {workdir / 'checkpoints'}/{STEPS - 1}" in output
    assert "another process of this run could not restore it" in outputs[0]
    assert (workdir / "checkpoints" / f"{STEPS}.damaged").is_dir()
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["step"] == STEPS
    assert records[-1]["loss"] == pytest.approx(ref_losses[-1], rel=1e-5)


def test_splash_attention_training_matches_xla(reference):
    """attention_impl='splash' (TPU kernels, interpret mode here) on a (2, 1, 2) mesh trains
    like the XLA reference on one device: same losses, same parameters."""
    config, batches, ref_losses, ref_params = reference
    config = config.copy_and_resolve_references()
    config.model.attention_impl = "splash"
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    losses, params = run_steps(config, mesh, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)


def test_tpu_slices_stack_along_data():
    """Two slices of four devices, config.mesh = FSDP over everything: FSDP stays inside a
    slice and the slices become the data axis."""
    import types
    devices = [types.SimpleNamespace(id=i, slice_index=i // 4) for i in range(8)]
    grid = sharding.device_grid({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    assert grid.shape == (2, 4, 1)
    assert [d.slice_index for d in grid[0, :, 0]] == [0] * 4
    assert [d.slice_index for d in grid[1, :, 0]] == [1] * 4
    grid = sharding.device_grid({"data": 1, "fsdp": 2, "tensor": 2}, devices)
    assert grid.shape == (2, 2, 2) and {d.slice_index for d in grid[1].ravel()} == {1}
    with pytest.raises(ValueError, match="different numbers of devices"):
        sharding.device_grid({"data": 1, "fsdp": -1, "tensor": 1}, devices[:7])


def test_a_tensor_group_over_two_processes_is_refused():
    """2 processes x 2 devices: tensor=2 keeps each group in a process; tensor=4 would give a
    group two processes' rows (it failed after compiling, in jax's batch assembly)."""
    import types
    devices = [types.SimpleNamespace(id=i, process_index=i // 2) for i in range(4)]
    sharding.check_tensor_groups(
        sharding.device_grid({"data": 2, "fsdp": 1, "tensor": 2}, devices), {})
    with pytest.raises(ValueError, match=r"config.mesh=\{'data': 1, 'fsdp': 1, 'tensor': 4\}: "
                                         r"its tensor axis \(4 devices\) spans processes \[0, 1\].*"
                                         r"at most 2 devices"):
        mesh = {"data": 1, "fsdp": 1, "tensor": 4}
        sharding.check_tensor_groups(sharding.device_grid(mesh, devices), mesh)


def test_host_batch_to_global_lays_out_micro_batches_and_eval_rows():
    """One process: micro batch i is rows [i*n/k, (i+1)*n/k) (as `micro_batches` builds them
    by hand), split over data x fsdp; without num_micro the rows stay as they are."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    host = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    micro = sharding.host_batch_to_global(host, mesh, num_micro=ACCUM)["input_ids"]
    np.testing.assert_array_equal(np.asarray(micro), micro_batches([host])["input_ids"])
    assert micro.sharding.shard_shape(micro.shape) == (ACCUM, 1, 3)
    rows = sharding.host_batch_to_global(host, mesh)["input_ids"]
    np.testing.assert_array_equal(np.asarray(rows), host["input_ids"])
    assert rows.sharding.shard_shape(rows.shape) == (2, 3)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        sharding.host_batch_to_global(host, mesh, num_micro=3)


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (1, 1, 4)])
def test_data_parallel_size_is_the_number_of_batch_shards(shape):
    """Rows per step are rounded to, and eval batches must divide over, data_parallel_size:
    the number of distinct row ranges the batch sharding cuts a batch into (data x fsdp; the
    tensor axis holds whole rows)."""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    shards = sharding.batch_sharding(mesh).devices_indices_map((8, 16))
    row_ranges = {index[0].indices(8) for index in shards.values()}
    assert sharding.data_parallel_size(mesh) == len(row_ranges) == shape[0] * shape[1]


def test_an_fsdp_size_that_does_not_divide_the_width_splits_another_dimension(caplog):
    """fsdp=3 on the tiny model (width 64, MLP 96, vocab 512): the MLP weights are split along
    their 96 (each device holds a third), the embedding, which no dimension of 3 divides, stays
    whole with a warning naming it; the model computes the same logits and gradients as on one
    device (the default mesh on 3, 6 or 12 GPUs split nothing of 4 of the 6 sizes)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from ettin_jax import model_loader  # pylint: disable=import-outside-toplevel
    model_config = make_config().model
    mesh = sharding.make_mesh({"data": 1, "fsdp": 3, "tensor": 1}, devices=jax.devices()[:3])
    model = model_loader.new_model(model_config)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with caplog.at_level("WARNING"):
        shardings = sharding.param_shardings(params, mesh)
        sharding.warn_unsplit(params, shardings)
    assert shardings["layers"][1]["mlp_in"].get_value().shard_shape((64, 2, 96)) == (64, 2, 32)
    assert shardings["layers"][1]["mlp_out"].get_value().shard_shape((96, 64)) == (32, 64)
    assert shardings["tok_embeddings"].get_value().shard_shape((512, 64)) == (512, 64)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "fsdp=3 divides no dimension of" in warnings[0] and \
        "tok_embeddings" in warnings[0], warnings

    ids = np.random.default_rng(0).integers(5, 500, (2, 24))

    @jax.jit
    def loss_and_grads(params):
        def loss(params):
            return jax.numpy.mean(jax.nn.log_softmax(
                nnx.merge(graphdef, params, rest)(ids).astype(np.float32))[..., 7])
        return jax.value_and_grad(loss)(params)
    want = loss_and_grads(params)
    got = loss_and_grads(jax.device_put(params, shardings))
    grads = got[1]
    assert grads["layers"][1]["mlp_in"].get_value().sharding.shard_shape((64, 2, 96)) == (64, 2, 32)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
