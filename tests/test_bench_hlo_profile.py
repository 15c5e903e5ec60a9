"""bench/hlo_profile.py: bytes and FLOPs of compiled programs against hand-computed values.

The programs are compiled by XLA for this machine's CPU; the profile reads them the way it
reads a GPU compile (bench/aot_gpu.py), from `compiled.as_text()`."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import configs.ettin_tiny
from bench import hlo_profile, memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernels(fn, *args, donate=()):
    text = jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()
    return hlo_profile.Module(text).kernels()


def _matmul(x, w):
    return x @ w


def test_dot_flops_and_source_line():
    kernels = _kernels(_matmul, jnp.ones((64, 128)), jnp.ones((128, 32)))
    matmuls = [k for k in kernels if k.kind == "matmul"]
    assert sum(k.flops for k in matmuls) == 2 * 64 * 128 * 32
    assert all(k.where.startswith("test_bench_hlo_profile.py:") and k.where.endswith(" _matmul")
               for k in matmuls)
    assert not any(k.backward for k in kernels)


def _scanned(x, w):
    def body(carry, _):
        return jnp.tanh(carry @ w), None
    return jax.lax.scan(body, x, None, length=5)[0]


def test_loop_bodies_count_their_trip_count():
    kernels = _kernels(_scanned, jnp.ones((32, 64)), jnp.ones((64, 64)))
    assert sum(k.flops for k in kernels) == 5 * 2 * 32 * 64 * 64
    # The backward pass of the same loop: twice the forward's matmuls, marked backward.
    grads = _kernels(jax.grad(lambda x, w: jnp.sum(_scanned(x, w)), argnums=1),
                     jnp.ones((32, 64)), jnp.ones((64, 64)))
    backward = sum(k.flops for k in grads if k.backward)
    assert backward == 2 * 5 * 2 * 32 * 64 * 64


def _update_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice(buffer, rows * 2.0, (start, 0))


def test_in_place_update_counts_the_update_not_the_buffer():
    buffer, rows = jnp.zeros((4096, 1024)), jnp.ones((8, 1024))
    kernels = _kernels(_update_rows, buffer, rows, 16, donate=(0,))
    update = rows.size * 4
    # Read the 8 rows, write 8 rows; the 16 MB buffer is neither read nor rewritten.
    assert sum(k.bytes for k in kernels) <= 2 * update + 64


def _scaled_columns(x):
    return x[:, :8] * 2.0


def test_a_sliced_operand_counts_the_slice():
    kernels = _kernels(_scaled_columns, jnp.ones((1024, 1024)))
    assert sum(k.bytes for k in kernels) == 2 * 1024 * 8 * 4


def _label_logits(logits, bias, labels):
    return jnp.take_along_axis(logits + bias[None, :], labels[:, None], axis=1)[:, 0]


def test_gathering_from_an_elementwise_result_reads_the_gathered_elements():
    """The cross-entropy's label logit: a gather from (logits + bias) fused into one kernel
    computes the sum at the gathered elements only; the 16 MB logits are not read whole."""
    kernels = _kernels(_label_logits, jnp.ones((4096, 1024)), jnp.ones((1024,)),
                       jnp.zeros((4096,), jnp.int32))
    rows = 4096 * 4
    # gathered logits + the whole bias (broadcast) + labels + the result
    assert sum(k.bytes for k in kernels) == rows + 1024 * 4 + rows + rows


# x @ w compiled for an H100 with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (bench/aot_gpu.py;
# jax 0.10.2), shortened: the matmul is a cuBLAS call returning (result, workspace).
CUBLAS_HLO = """HloModule jit__lambda, is_scheduled=true

FileNames
1 "<string>"

FunctionNames
1 "<module>"
2 "<lambda>"

FileLocations
1 {file_name_id=1 function_name_id=1 line=11 end_line=11 column=4 end_column=17}
2 {file_name_id=1 function_name_id=2 line=8 end_line=8 column=25 end_column=40}
3 {file_name_id=1 function_name_id=2 line=8 end_line=8 column=34 end_column=39}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}


%fused_convert (param_0.5: bf16[256,128]) -> bf16[256,128] {
  %param_0.5 = bf16[256,128]{1,0} parameter(0), metadata={scheduling_name="param_0.5"}
  %convert.5 = f32[256,128]{1,0} convert(%param_0.5), metadata={scheduling_name="convert.5"}
  %tanh.1.3 = f32[256,128]{1,0} tanh(%convert.5), metadata={op_name="jit(<lambda>)/tanh" scheduling_name="tanh.1.3" stack_frame_id=2}
  ROOT %convert.1.1 = bf16[256,128]{1,0} convert(%tanh.1.3), metadata={scheduling_name="convert.1.1"}
}

ENTRY %main.1 (x.1: bf16[256,512], w.1: bf16[512,128]) -> bf16[256,128] {
  %w.1 = bf16[512,128]{1,0} parameter(1), sharding={replicated}, metadata={op_name="w" scheduling_name="w.1"}
  %x.1 = bf16[256,512]{1,0} parameter(0), sharding={replicated}, metadata={op_name="x" scheduling_name="x.1"}
  %custom-call.1 = (bf16[256,128]{1,0}, s8[4194304]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(<lambda>)/dot_general" scheduling_name="custom-call.1" stack_frame_id=3}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"alpha_imag":0}}
  %get-tuple-element.1 = bf16[256,128]{1,0} get-tuple-element(%custom-call.1), index=0, metadata={op_name="jit(<lambda>)/dot_general" scheduling_name="get-tuple-element.1" stack_frame_id=3}
  ROOT %loop_convert_fusion = bf16[256,128]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_convert, metadata={scheduling_name="loop_convert_fusion"}, backend_config={"operation_queue_id":"0"}
}
"""


def test_cublas_call_is_a_matmul_without_its_workspace():
    kernels = hlo_profile.Module(CUBLAS_HLO).kernels()
    assert [(k.kind, k.where) for k in kernels] == [("matmul", "<string>:8 <lambda>"),
                                                    ("other", "fusion")]
    matmul, tanh = kernels
    assert matmul.flops == 2 * 256 * 512 * 128
    assert matmul.bytes == 2 * (256 * 512 + 512 * 128 + 256 * 128)   # bf16 in and out
    assert tanh.bytes == 2 * 2 * 256 * 128


def test_roofline_takes_the_slower_of_flops_and_bytes():
    kernels = [hlo_profile.Kernel("a.py:1 f", False, "other", bytes=3_000_000_000, flops=0, count=1),
               hlo_profile.Kernel("a.py:1 f", False, "other", bytes=1_000_000_000, flops=0, count=2),
               hlo_profile.Kernel("b.py:2 g", True, "matmul", bytes=1_000, flops=2e12, count=1)]
    summary = hlo_profile.summarize(kernels, peak_flops=1e15, bandwidth=1e12)
    lines = {(line.where, line.kind): line for line in summary["lines"]}
    assert lines["a.py:1 f", "other"].seconds == pytest.approx(4e-3)   # bytes bound
    assert lines["a.py:1 f", "other"].count == 3
    assert lines["b.py:2 g", "matmul"].seconds == pytest.approx(2e-3)  # FLOPs bound
    assert [line.where for line in summary["lines"]] == ["a.py:1 f", "b.py:2 g"]
    assert summary["totals"]["other"].bytes == 4_000_000_000


def test_train_step_profile_accounts_for_the_model_matmuls(tmp_path):
    """The tiny model's compiled train step: the matmul FLOPs the profile finds outside the
    attention (XLA's attention on CPU, itself dots) equal the hand count of forward +
    backward (3x forward) of every projection and of the decoder over the masked slots, and
    the command line prints the table from the saved HLO."""
    config = configs.ettin_tiny.get_config("mlm")
    config.model.scan_layers = False
    config.train.loss_vocab_chunk = 128   # 4 chunks: a loop, which XLA cannot merge with the forward
    rows, seq_len = 2, 64
    text = memory.compiled_step_fn(config, seq_len)(rows).as_text()
    kernels = hlo_profile.Module(text).kernels()
    flops = sum(k.flops for k in kernels if not k.where.startswith("attention.py:"))
    assert any(k.flops and k.where.startswith("attention.py:") for k in kernels)
    m = config.model
    tokens = rows * seq_len
    per_layer = m.hidden_size * (3 * m.hidden_size + m.hidden_size + 3 * m.intermediate_size)
    from data_pipeline import objectives
    slots = rows * objectives.max_predictions(seq_len, config.train.mask_ratio)
    head = slots * (m.hidden_size * m.hidden_size + m.hidden_size * m.vocab_size)
    expected = 3 * 2 * (tokens * m.num_layers * per_layer + head)
    # The decoder's backward recomputes its logits chunk by chunk (ettin_jax.cross_entropy):
    # one more forward of the decoder matmul.
    expected += 2 * slots * m.hidden_size * m.vocab_size
    assert flops == expected

    path = tmp_path / "step.hlo"
    path.write_text(text)
    done = subprocess.run([sys.executable, "bench/hlo_profile.py", f"--hlo={path}",
                           "--device_kind=H100", "--top=5"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "Roofline step time" in done.stdout and "model.py:" in done.stdout
    missing = subprocess.run([sys.executable, "bench/hlo_profile.py", "--hlo=/nonexistent",
                              "--device_kind=H100"], cwd=ROOT, capture_output=True, text=True,
                             check=False)
    assert missing.returncode != 0 and "--hlo=/nonexistent: no such file" in missing.stderr


def test_train_step_profile_names_each_kernel_by_its_operation():
    """bench/train_step.py --profile names a trace's kernels through the same parser: the
    dots of a compiled scan (inside its loop body) get their operation's name."""
    from bench import train_step
    text = jax.jit(_scanned).lower(jnp.ones((32, 64)), jnp.ones((64, 64))).compile().as_text()
    names = train_step.op_names(text)
    module = hlo_profile.Module(text)
    dots = [name for name, ins in module.by_name.items() if ins.opcode == "dot"]
    # The call's own name between body and dot_general is jax's: closed_call in 0.10,
    # eval_jaxpr in 0.11.
    assert dots and all(re.fullmatch(r"jit\(_scanned\)/while/body/\w+/dot_general", names[name])
                        for name in dots), names


# Our forward attention kernel as XLA compiles it for an H100 (bench/hlo_profile.py --hlo_out,
# jax 0.10.2), shortened to one call (its Triton IR elided), plus the same kernel without a
# mask scope in its op name.
TRITON_ATTENTION_HLO = """HloModule jit_train_step, is_scheduled=true

ENTRY %main.1 (q.1: bf16[2,256,3,64], ks.1: s32[2,256], ke.1: s32[2,256]) -> bf16[2,256,3,64] {
  %q.1 = bf16[2,256,3,64]{3,2,1,0} parameter(0), metadata={op_name="q" scheduling_name="q.1"}
  %ks.1 = s32[2,256]{1,0} parameter(1), metadata={op_name="ks" scheduling_name="ks.1"}
  %ke.1 = s32[2,256]{1,0} parameter(2), metadata={op_name="ke" scheduling_name="ke.1"}
  %pallas_call.1 = (bf16[2,256,3,64]{3,2,1,0}, f32[2,3,256]{2,1,0}) custom-call(%q.1, %q.1, %q.1, %ks.1, %ke.1), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(train_step)/jvp(attention_causal_window_64_0)/ettin_flash_fwd/pallas_call" scheduling_name="pallas_call.1"}, backend_config={debug = false, grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 3 : i32, ir = "", name = "ettin_flash_fwd", num_stages = 2 : i32, num_warps = 4 : i32}
  %out.1 = bf16[2,256,3,64]{3,2,1,0} get-tuple-element(%pallas_call.1), index=0
  %pallas_call.2 = (bf16[2,256,3,64]{3,2,1,0}, f32[2,3,256]{2,1,0}) custom-call(%out.1, %q.1, %q.1, %ks.1, %ke.1), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(train_step)/jvp(ettin_flash_fwd)/pallas_call" scheduling_name="pallas_call.2"}, backend_config={debug = false, grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 3 : i32, ir = "", name = "ettin_flash_fwd", num_stages = 2 : i32, num_warps = 4 : i32}
  ROOT %out.2 = bf16[2,256,3,64]{3,2,1,0} get-tuple-element(%pallas_call.2), index=0
}
"""


def test_attention_kernel_flops_from_its_mask_scope():
    """A Triton attention kernel is priced by the dots of the tiles it visits, its mask read
    from the op name's scope: the decoder's (64, 0) causal window at seq 256 visits 2 + 3 key
    tiles of 64 for the two query tiles of 128. Without a scope it has bytes only."""
    scoped, unscoped = hlo_profile.Module(TRITON_ATTENTION_HLO).kernels()
    assert scoped.kind == unscoped.kind == "attention" and not scoped.backward
    batch, heads, head_dim = 2, 3, 64
    assert scoped.flops == 5 * 128 * 64 * head_dim * 2 * 2 * batch * heads
    assert unscoped.flops == 0
    q_bytes, lse_bytes = 2 * 256 * 3 * 64 * 2, 2 * 3 * 256 * 4
    assert scoped.bytes == unscoped.bytes == 4 * q_bytes + 2 * 2 * 256 * 4 + lse_bytes
