"""bench/memory.py: the search finds the largest micro batch whose compiled train step fits."""
import functools

import configs.ettin_tiny
from bench import memory


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
    # 16 global rows, `rows` per device: the fewest micro batches that split them evenly.
    accum = memory.grad_accum_steps(16, rows)
    assert 16 % accum == 0 and 16 // accum <= rows
    assert all(16 // fewer > rows for fewer in range(1, accum) if 16 % fewer == 0)
