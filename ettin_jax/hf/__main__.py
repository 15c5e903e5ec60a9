"""Command line of the transformers interop (the library is `ettin_jax.hf`).

    python -m ettin_jax.hf export --checkpoint=RUN_DIR --out=HF_DIR [--tokenizer=tokenizer.json]
    python -m ettin_jax.hf export --config=configs/ettin_17m.py:mlm --out=HF_DIR   # fresh init
    python -m ettin_jax.hf import --hf=HF_DIR --out=RUN_DIR

`--config=configs/...` is read relative to the working directory; run from the repository
root (`python -m` adds the working directory to the import path, where the config files
find the `configs` package they import).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from absl import flags
from ml_collections import config_flags

from ettin_jax import checkpoint
from ettin_jax import cli
from ettin_jax import hf
from ettin_jax import model as model_lib
from ettin_jax import model_loader

# What export writes (save_hf, save_tokenizer): a directory holding only these is a previous
# export and is written over; anything else in it needs --overwrite.
_EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json",
                 "special_tokens_map.json")
_EXPORT_PREFIXES = ("tokenizer", "vocab", "merges")


def foreign_files(directory: str) -> list[str]:
    """The entries of `directory` that an export does not write (sorted)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name not in _EXPORT_FILES and not name.startswith(_EXPORT_PREFIXES))


def write_export(model, directory: str, tokenizer=None):
    """Writes the export into `directory`, replacing a previous export's files there (its
    tokenizer or generation config would otherwise stay beside weights they do not belong to).

    The files are written in a staging directory beside it first, so that an export that fails
    half way (a bad tokenizer, a full disk) leaves the previous export whole; each file then
    replaces its namesake in one rename."""
    directory = os.path.abspath(directory)
    foreign = set(foreign_files(directory))
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.export-",
                               dir=os.path.dirname(directory))
    try:
        hf.save_hf(model, model.config, staging, tokenizer=tokenizer)
        written = set(os.listdir(staging))
        os.makedirs(directory, exist_ok=True)     # only now: a failed export leaves no --out
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        for name in set(os.listdir(directory)) - written - foreign:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_finite(model):
    """Raises cli.UserError naming the first transformers tensor with NaN or inf values."""
    for key, array in hf.hf_state_dict(model).items():
        bad = int(array.size - np.isfinite(array).sum())
        if bad:
            raise cli.UserError(f"tensor {key!r} has {bad:,} non-finite values (NaN or inf) of "
                                f"{array.size:,}; not exporting a diverged model (pick an earlier "
                                "checkpoint with --step)")


def _export(flags_):
    if bool(flags_.checkpoint) == bool(flags_.config):
        raise cli.UserError("export needs exactly one of --checkpoint=RUN_DIR or --config=FILE:ARG")
    if flags_.step is not None and not flags_.checkpoint:
        raise cli.UserError("--step picks a checkpoint of --checkpoint=RUN_DIR; --config exports "
                            "a fresh initialisation")
    if flags_.hf:
        raise cli.UserError("--hf is import's input; export reads --checkpoint or --config")
    if flags_.tokenizer and not os.path.exists(flags_.tokenizer):   # before loading the model
        raise cli.UserError(f"--tokenizer={flags_.tokenizer} does not exist; pass a tokenizer.json "
                            "or a transformers tokenizer directory")
    foreign = foreign_files(flags_.out)
    if foreign and not flags_.overwrite:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise cli.UserError(f"--out={flags_.out} holds files an export does not write ({listed}); "
                            "choose an empty or new directory, or pass --overwrite")
    if flags_.checkpoint:
        loaded = model_loader.from_run(flags_.checkpoint, step=flags_.step)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model = model_loader.from_config(flags_.config.model, seed=flags_.config.seed)
        tokenizer = None
    check_finite(model)
    tokenizer = flags_.tokenizer or tokenizer
    write_export(model, flags_.out, tokenizer)
    kind = "decoder" if model.config.causal else "encoder"
    print(f"wrote {kind} with {model_lib.count_params(model):,} parameters to {flags_.out}"
          f"{' (with tokenizer)' if tokenizer else ''}")


def _import(flags_):
    if not flags_.hf:
        raise cli.UserError("import needs --hf=HF_DIR")
    unused = [f"--{name}" for name in ("checkpoint", "config", "step", "tokenizer")
              if getattr(flags_, name) is not None] + (["--overwrite"] if flags_.overwrite else [])
    if unused:
        raise cli.UserError(f"import reads only --hf and --out, not {', '.join(unused)} (the "
                            "tokenizer in the transformers directory is used when it has one)")
    existing = checkpoint.checkpoint_dir(flags_.out)
    if os.path.isdir(existing) and os.listdir(existing):
        # Orbax would keep the run's newer steps and skip a step 0 behind them, silently.
        raise cli.UserError(f"--out={flags_.out} already holds checkpoints ({existing}: "
                            f"{', '.join(sorted(os.listdir(existing))[:5])}); import into a new "
                            "directory")
    loaded = model_loader.from_hf(flags_.hf)
    tokenizer = None
    if loaded.tokenizer:
        # A copy in the run: export, glue and generate find it there, as a training run's.
        tokenizer = os.path.abspath(os.path.join(flags_.out, "tokenizer"))
        hf.copy_tokenizer_files(loaded.tokenizer, tokenizer)
    checkpoint.save_imported(loaded.model, loaded.model.config, flags_.out, tokenizer=tokenizer)
    print(f"wrote {model_lib.count_params(loaded.model):,} parameters"
          f"{' and the tokenizer' if tokenizer else ''} from {flags_.hf} to {flags_.out}; "
          f"continue training with --config.train.init_from={flags_.out}")


def define_flags():
    flags.DEFINE_string("checkpoint", None, "export: a training run's workdir (its latest checkpoint)")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest)")
    config_flags.DEFINE_config_file("config", None, "export: FILE:ARG to export a freshly "
                                    "initialised model, e.g. configs/ettin_17m.py:mlm")
    flags.DEFINE_string("tokenizer", None, "export: tokenizer.json or a directory of tokenizer "
                        "files to write beside the weights")
    flags.DEFINE_string("out", None, "export: the transformers directory to write; "
                        "import: the run directory to write (must hold no checkpoints)",
                        required=True)
    flags.DEFINE_bool("overwrite", False, "export: write into --out even if it holds files "
                      "other than a previous export's")
    flags.DEFINE_string("hf", None, "import: a transformers directory (config.json + model.safetensors, a "
                        "sharded index or pytorch_model.bin)")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("export", "import"):
        raise cli.UserError("usage: python -m ettin_jax.hf {export|import} [flags]; --help "
                            "lists the flags")
    if argv[1] == "export":
        _export(flags.FLAGS)
    else:
        _import(flags.FLAGS)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__, positional=True)
