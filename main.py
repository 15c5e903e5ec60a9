"""Trains an Ettin model: `python main.py --config=configs/ettin_150m.py:mlm --workdir=runs/enc150m`.

Re-running the same command resumes from the workdir's newest checkpoint. Overrides go
through `--config.a.b=value` (e.g. `--config.optimizer.peak_lr=3e-4`). Later phases name the
previous run: `--config=configs/ettin_150m.py:mlm_ext --config.train.init_from=runs/enc150m`.
A pair, `--config=configs/ettin_150m.py:mlm+clm --workdir=runs/pair150m`, trains an encoder
and a decoder on identical data in `runs/pair150m/mlm` and `runs/pair150m/clm` (ettin_jax.pairs).
With several hosts, start one process per host (or per GPU) with `--distributed`.

The config, the workdir and config.train.init_from are checked before JAX starts: a mistake
there ends in one `error:` line (exit 1). Compiled programs are cached on disk in
config.train.compilation_cache_dir (default ~/.cache/ettin-jax/xla; "" turns the cache off;
a JAX_COMPILATION_CACHE_DIR environment variable wins), so a restart skips most compilation;
with config.train.compilation_cache_xla_caches (default "all") XLA also keeps its GPU kernels
and GEMM autotuning results there, which a changed program reuses.
"""
import importlib.util
import os
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import base as config_base
from ettin_jax import cli
from ettin_jax import schedules

FLAGS = flags.FLAGS


def define_flags():
    config_flags.DEFINE_config_file(
        "config", None, "FILE:ARG, e.g. configs/ettin_150m.py:mlm (runs: mlm, clm, mlm_ext, "
        "clm_ext, mlm_decay, clm_decay, mlm_from_clm, clm_from_mlm; options: ,mntp=true "
        ",window=transformers; pairs on identical data: mlm+clm, mlm_ext+clm_ext, ...)",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, TensorBoard logs and metrics.jsonl go")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (several "
                      "processes; the coordinator comes from the cluster environment or the "
                      "flags below)")
    flags.DEFINE_string("coordinator_address", None, "with --distributed: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
    flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
    flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"],
                      "with --distributed on CPU: the collectives implementation (gloo for tests)")
    flags.DEFINE_bool("dry_run", False, "print the run's plan (tokens per step, steps, LR, "
                      "checkpoints, parameters, what it restores) and exit; compiles, trains "
                      "and writes nothing (ettin_jax.plan)")
    flags.DEFINE_integer("plan_devices", None, "with --dry_run: plan for this many devices "
                         "(e.g. the GPUs the run will have) instead of this machine's")
    flags.DEFINE_float("plan_mean_length", None, "with --dry_run: plan without reading the data "
                       "(it need not exist yet), as if its mean sequence length were this many "
                       "tokens (Ettin's: ~610 in phase 1, ~543 after); plans the config at full "
                       "scale even with no data.mixture set")
    flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(workdir: str):
    """--workdir names a local directory, or a place to make one (a pair's workdir as well as
    each side's: workdir/mlm of an empty --workdir is ./mlm)."""
    if not workdir.strip():
        raise cli.UserError("--workdir is empty")
    if cli.is_remote(workdir):
        # The lock, run_identity.json, metrics.jsonl and TensorBoard files are written with
        # local file operations; without this check the run trains until its first save.
        raise cli.UserError(f"--workdir={workdir}: a workdir must be a local or mounted path "
                            "(its lock, identity, metrics and TensorBoard files use local file "
                            "operations); mount the bucket (e.g. gcsfuse) and pass the mount's "
                            "path")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise cli.UserError(f"--workdir={workdir} is a file, not a directory")


def validate(config, workdir: str, *, dry_run: bool = False):
    """What can be checked without JAX, with messages naming the flag or config key. A dry run
    plans with a missing init_from too (the plan says a real run would find no checkpoint)."""
    check_workdir(workdir)
    if config.objective not in config_base.OBJECTIVES:
        raise cli.UserError(f"config.objective={config.objective!r}: expected one of "
                            f"{config_base.OBJECTIVES}")
    if config.phase not in config_base.PHASES:
        raise cli.UserError(f"config.phase={config.phase!r}: expected one of {config_base.PHASES}")
    from ettin_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    source = workdir_lib.init_source(config)
    # A dry run plans with a missing init_from too (its plan says a real run would find no
    # checkpoint), but a source that is there is checked as a real run checks it.
    if not dry_run or (source and os.path.isdir(source)):
        workdir_lib.check_init_from(config, workdir)
    if config.data.mixture:   # the demo variant's schedule is checked once it is applied
        schedules.validate(config)
    xla_caches_setting(config)


# XLA's caches that jax keeps beside the executables (jax_persistent_cache_enable_xla_caches).
XLA_CACHES = ("xla_gpu_kernel_cache_file", "xla_gpu_per_fusion_autotune_cache_dir")


def xla_caches_setting(config) -> str | None:
    """jax_persistent_cache_enable_xla_caches from config.train.compilation_cache_xla_caches
    ("all", "" or a comma list of XLA_CACHES), or None when the environment sets it."""
    if "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES" in os.environ:
        return None
    value = config.train.compilation_cache_xla_caches.strip()
    if value == "all":
        return value
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in ("", *XLA_CACHES)]
    if unknown:
        # "all" inside a list is a mix-up of the two forms, not an unknown cache name
        what = ("\"all\" cannot be combined with other names" if "all" in unknown
                else f"unknown {unknown[0]!r}")
        raise cli.UserError(f"config.train.compilation_cache_xla_caches={value!r}: {what}; "
                            f"expected \"all\", \"\" or a comma list of {', '.join(XLA_CACHES)}")
    return value


def compilation_cache_settings(config) -> tuple[str, float] | None:
    """(directory, min compile seconds) of the persistent XLA cache, or None when the
    environment already configures it (JAX reads JAX_COMPILATION_CACHE_DIR itself) or
    config.train.compilation_cache_dir is ""."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    directory = config.train.compilation_cache_dir
    if not directory:
        return None
    return (os.path.expanduser(directory) if not cli.is_remote(directory) else directory,
            float(config.train.compilation_cache_min_compile_secs))


def remove_empty_cache_entries(directory: str, *, older_than_s: float = 60.0) -> list[str]:
    """Deletes the empty entries of jax's compilation cache in `directory`; returns them.

    jax writes an entry in place, so a full disk leaves it empty, and it never writes one that
    exists: every later start compiled that program cold, warning that it cannot read it.
    Entries younger than `older_than_s` may be another process's write under way."""
    if cli.is_remote(directory) or not os.path.isdir(directory):
        return []
    removed = []
    for entry in os.scandir(directory):
        try:
            stat = entry.stat()
            if (entry.name.endswith("-cache") and entry.is_file() and stat.st_size == 0
                    and time.time() - stat.st_mtime > older_than_s):
                os.remove(entry.path)
                removed.append(entry.path)
        except FileNotFoundError:    # another process removed it first
            continue
    if removed:
        logging.warning("removed %d empty entries of the compilation cache %s (a full disk "
                        "leaves them; their programs compile again): %s", len(removed),
                        directory, ", ".join(os.path.basename(p) for p in removed[:3]))
    return removed


def start_jax(config):
    """Compilation cache and (with --distributed) the process group; returns jax."""
    import jax  # pylint: disable=import-outside-toplevel  # after flags: XLA_FLAGS may be set

    cache = compilation_cache_settings(config)
    if cache is not None:
        directory, min_secs = cache
        jax.config.update("jax_compilation_cache_dir", directory)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    xla_caches = xla_caches_setting(config)
    if xla_caches is not None:
        jax.config.update("jax_persistent_cache_enable_xla_caches", xla_caches)
    if FLAGS.distributed:
        if FLAGS.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir:
        remove_empty_cache_entries(cache_dir)
    logging.info("JAX process %d of %d, local devices %s; compilation cache %s",
                 jax.process_index(), jax.process_count(), jax.local_devices(),
                 f"{cache_dir} (XLA caches: "
                 f"{jax.config.jax_persistent_cache_enable_xla_caches or 'none'})"
                 if cache_dir else "off")
    return jax


def _pair_configs(pair: str) -> list:
    """The two runs of a pair config: the --config file's get_config of each run of `pair`,
    with the same --config.* overrides (configs/base.py describes the grammar; each side's
    train.init_from is its side of the previous pair's workdir)."""
    from ettin_jax import pairs  # pylint: disable=import-outside-toplevel
    config_flag = FLAGS["config"]
    path = config_flags.get_config_filename(config_flag).partition(":")[0]
    spec = importlib.util.spec_from_file_location("pair_config_file", path)
    config_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_file)
    return pairs.side_configs(config_file.get_config, config_base.split_pair(pair),
                              config_flags.get_override_values(config_flag),
                              planning=FLAGS.dry_run)


def main(argv):
    config, workdir = FLAGS.config, FLAGS.workdir
    # A pair (`mlm+clm`) is two ordinary runs in workdir/mlm and workdir/clm.
    check_workdir(workdir)
    sides = ([(c, os.path.join(workdir, c.objective)) for c in _pair_configs(config.pair)]
             if config.pair else [(config, workdir)])
    for side_config, side_workdir in sides:
        validate(side_config, side_workdir, dry_run=FLAGS.dry_run)
    for name in ("plan_devices", "plan_mean_length"):
        if FLAGS[name].value is not None and not FLAGS.dry_run:
            raise cli.UserError(f"--{name} plans a run: it needs --dry_run")
        if FLAGS[name].value is not None and not FLAGS[name].value > 0:
            raise cli.UserError(f"--{name}={FLAGS[name].value}: must be > 0")
    if FLAGS.dry_run:   # before jax.distributed and any compilation; writes nothing
        from ettin_jax import plan  # pylint: disable=import-outside-toplevel
        for side_config, side_workdir in sides:
            print(plan.format_plan(plan.make_plan(
                side_config, side_workdir, num_devices=FLAGS.plan_devices,
                assumed_mean_length=FLAGS.plan_mean_length)))
        return 0
    start_jax(config)
    if config.pair:
        from ettin_jax import pairs  # pylint: disable=import-outside-toplevel
        pairs.train_pair([side_config for side_config, _ in sides], workdir)
        return 0
    from ettin_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, workdir)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__, positional="overrides are --config.KEY=VALUE")
