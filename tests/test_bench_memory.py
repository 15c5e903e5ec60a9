"""bench/memory.py: the search finds the largest micro batch whose compiled train step fits."""
import functools

import configs.ettin_tiny
from bench import memory
from ettin_jax import schedules


def test_largest_fitting_micro_batch_on_compiled_train_step():
    config = configs.ettin_tiny.get_config("mlm")
    step_memory = memory.step_memory_fn(config, seq_len=64)
    compiled_peak = functools.lru_cache(lambda rows: step_memory(rows)["peak"])
    # A budget between two compiled sizes: the answer lies in [2, 4).
    budget = (compiled_peak(2) + compiled_peak(4)) / 2
    assert compiled_peak(2) < budget < compiled_peak(4)

    rows, probes = memory.largest_fitting(compiled_peak, budget, max_rows=16)

    assert 2 <= rows < 4
    assert compiled_peak(rows) <= budget < compiled_peak(rows + 1)
    assert all(probes[n] == compiled_peak(n) for n in probes)
    # The search's answer as the config's limit: 8 global rows (no mean: full rows), `rows`
    # per device: the fewest micro batches that split them evenly.
    config.train.grad_accum_steps, config.train.max_micro_tokens = 0, rows * config.train.seq_len
    accum = schedules.grad_accum_steps(config)
    assert 8 % accum == 0 and 8 // accum <= rows
    assert all(8 // fewer > rows for fewer in range(1, accum) if 8 % fewer == 0)


def test_compiling_for_a_gpu_without_its_plugin_says_what_to_install():
    """--target=h100 needs jax's CUDA plugin (bench/aot_gpu.py); without it the error names
    the pip line for this jax version. (Where the plugin is installed, the device is made.)"""
    import importlib.util

    import jax
    import pytest

    from bench import aot_gpu
    from ettin_jax import cli
    if importlib.util.find_spec("jax_plugins") is not None and \
            importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
        assert aot_gpu.device("h100").device_kind == "NVIDIA H100 80GB HBM3"
        return
    with pytest.raises(cli.UserError, match=rf"pip install jax-cuda12-plugin=={jax.__version__} "
                                            rf"jax-cuda12-pjrt=={jax.__version__}"):
        aot_gpu.device("h100")
    with pytest.raises(cli.UserError, match="expected one of"):
        aot_gpu.device("a100")
