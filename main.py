"""Trains an Ettin model: `python main.py --config=configs/ettin_150m.py:mlm --workdir=runs/enc150m`.

Re-running the same command resumes from the workdir's newest checkpoint. Overrides go
through `--config.a.b=value` (e.g. `--config.optimizer.peak_lr=3e-4`). Later phases name the
previous run: `--config=configs/ettin_150m.py:mlm_ext --config.train.init_from=runs/enc150m`.
A pair, `--config=configs/ettin_150m.py:mlm+clm --workdir=runs/pair150m`, trains an encoder
and a decoder on identical data in `runs/pair150m/mlm` and `runs/pair150m/clm` (ettin_jax.pairs).
With several hosts, start one process per host (or per GPU) with `--distributed`.
"""
import importlib.util

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "FILE:ARG, e.g. configs/ettin_150m.py:mlm (runs: mlm, clm, mlm_ext, clm_ext, "
    "mlm_decay, clm_decay, mlm_from_clm, clm_from_mlm; options: ,mntp=true ,window=training; "
    "pairs on identical data: mlm+clm, mlm_ext+clm_ext, ...)",
    lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, TensorBoard logs and metrics.jsonl go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (several processes; "
                  "the coordinator comes from the cluster environment or the flags below)")
flags.DEFINE_string("coordinator_address", None, "with --distributed: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"],
                  "with --distributed on CPU: the collectives implementation (gloo for tests)")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbaxInfo(logging.logging.Filter):
    """Drops Orbax's INFO chatter (dozens of lines per save); its warnings and errors stay."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def _pair_configs(pair: str) -> list:
    """The two runs of a pair config: the --config file's get_config of each run of `pair`,
    with the same --config.* overrides (configs/base.py describes the grammar)."""
    from configs import base  # pylint: disable=import-outside-toplevel
    from ettin_jax import pairs  # pylint: disable=import-outside-toplevel
    config_flag = flags.FLAGS["config"]
    path = config_flags.get_config_filename(config_flag).partition(":")[0]
    spec = importlib.util.spec_from_file_location("pair_config_file", path)
    config_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_file)
    return pairs.side_configs(config_file.get_config, base.split_pair(pair),
                              config_flags.get_override_values(config_flag))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides are --config.KEY=VALUE")
    logging.get_absl_handler().addFilter(_QuietOrbaxInfo())
    import jax  # pylint: disable=import-outside-toplevel  # after flags: XLA_FLAGS may be set

    if flags.FLAGS.distributed:
        if flags.FLAGS.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", flags.FLAGS.cpu_collectives)
        jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                                   num_processes=flags.FLAGS.num_processes,
                                   process_id=flags.FLAGS.process_id)
    logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())

    if flags.FLAGS.config.pair:
        from ettin_jax import pairs  # pylint: disable=import-outside-toplevel
        pairs.train_pair(_pair_configs(flags.FLAGS.config.pair), flags.FLAGS.workdir)
        return
    from ettin_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
