"""Command line of the transformers interop (the library is `ettin_jax.hf`).

    python -m ettin_jax.hf export --checkpoint=RUN_DIR --out=HF_DIR [--tokenizer=tokenizer.json]
    python -m ettin_jax.hf export --config=configs/ettin_17m.py:mlm --out=HF_DIR   # fresh init
    python -m ettin_jax.hf import --hf=HF_DIR --out=RUN_DIR

`--config=configs/...` is read relative to the working directory; run from the repository
root (`python -m` adds the working directory to the import path, where the config files
find the `configs` package they import).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ettin_jax import checkpoint
from ettin_jax import hf
from ettin_jax import model as model_lib
from ettin_jax import model_loader


def _export(flags_):
    if bool(flags_.checkpoint) == bool(flags_.config):
        raise app.UsageError("export needs exactly one of --checkpoint=RUN_DIR or --config=FILE:ARG")
    if flags_.checkpoint:
        loaded = model_loader.from_run(flags_.checkpoint, step=flags_.step)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model = model_loader.from_config(flags_.config.model, seed=flags_.config.seed)
        tokenizer = None
    tokenizer = flags_.tokenizer or tokenizer
    hf.save_hf(model, model.config, flags_.out, tokenizer=tokenizer)
    kind = "decoder" if model.config.causal else "encoder"
    print(f"wrote {kind} with {model_lib.count_params(model):,} parameters to {flags_.out}"
          f"{' (with tokenizer)' if tokenizer else ''}")


def _import(flags_):
    model, model_config = model_loader.load_hf(flags_.hf)
    checkpoint.save_imported(model, model_config, flags_.out)
    print(f"wrote {model_lib.count_params(model):,} parameters from {flags_.hf} to {flags_.out}; "
          f"continue training with --config.train.init_from={flags_.out}")


def define_flags():
    flags.DEFINE_string("checkpoint", None, "export: a training run's workdir (its latest checkpoint)")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest)")
    config_flags.DEFINE_config_file("config", None, "export: FILE:ARG to export a freshly "
                                    "initialised model, e.g. configs/ettin_17m.py:mlm")
    flags.DEFINE_string("tokenizer", None, "export: tokenizer.json or a directory of tokenizer "
                        "files to write beside the weights")
    flags.DEFINE_string("out", None, "export: the transformers directory to write; "
                        "import: the run directory to write", required=True)
    flags.DEFINE_string("hf", None, "import: a transformers directory (config.json + model.safetensors)")


def run(args):
    if len(args) != 2 or args[1] not in ("export", "import"):
        raise app.UsageError("usage: python -m ettin_jax.hf {export|import} [flags]; "
                             "--helpfull lists the flags")
    try:
        if args[1] == "export":
            _export(flags.FLAGS)
        else:
            if not flags.FLAGS.hf:
                raise app.UsageError("import needs --hf=HF_DIR")
            _import(flags.FLAGS)
    except (hf.HFFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    define_flags()
    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
