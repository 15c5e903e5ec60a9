"""Command-line support shared by the entry points (`python -m ettin_jax.glue`,
`python -m ettin_jax.generate`, ...).

The model-source flags `--checkpoint --hf --tokenizer --dtype` are the arguments of
`model_loader.load_for_inference`. An entry point defines them with
`define_model_source_flags` and then calls `flags.adopt_module_key_flags(cli)` so that its
--help lists them.
"""
from __future__ import annotations

from absl import flags

MODEL_SOURCE_FLAGS = ("checkpoint", "hf", "tokenizer", "dtype")


def define_model_source_flags(checkpoint_use: str = "its newest checkpoint"):
    """Defines --checkpoint / --hf / --tokenizer / --dtype; `checkpoint_use` says in --help
    what the tool does with a run's checkpoint."""
    flags.DEFINE_string("checkpoint", None, f"a training run's workdir: {checkpoint_use}")
    flags.DEFINE_string("hf", None, "a transformers directory (config.json + model.safetensors)")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory or tokenizer.json (default: the "
                        "one saved with the run or the transformers directory)")
    flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "compute dtype of the matmuls "
                      "(parameters stay float32); default: the model config's")
