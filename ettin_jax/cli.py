"""Command-line support shared by the entry points: one runner and the model-source flags.

Every entry point (main.py, `python -m ettin_jax.hf|glue|generate|compare`,
`python -m data_pipeline.prepare|tokenizer|demo_corpus|inspect`, bench/*.py) follows one rule:
its flags are absl flags defined by a module-level `define_flags()` (never at import, so the
module stays importable as a library), its work is `main(argv) -> exit status`, and it ends in

    if __name__ == "__main__":
        cli.run(main, define_flags, usage=__doc__)

`run` parses the flags (ml_collections config files and `--config.key=value` overrides
included) and prints user errors as ONE line `error: <message>` on stderr with exit status 1:
bad or missing flags, a missing config file, an unknown config key, and any `UserError`,
`ValueError` (the project's own error classes, e.g. HFFormatError, GlueDataError, ShardError,
TokenizerError, derive from it), `OSError` or `app.UsageError` raised by `main`. Any other
exception is a bug and keeps its traceback; `--verbose` shows the traceback of user errors too.
Orbax's INFO lines are dropped (`QuietOrbaxInfo`), its warnings kept.
`--help` prints the usage (the module docstring) and the tool's flags and exits 0
(`--helpfull`: every flag). Ctrl-C outside training exits 130 with one line.

The model-source flags `--checkpoint --hf --tokenizer --dtype` are the arguments of
`model_loader.load_for_inference`. An entry point defines them with
`define_model_source_flags` and then calls `flags.adopt_module_key_flags(cli)` so that its
--help lists them.

This module imports nothing of the project (data_pipeline modules use it too).
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODEL_SOURCE_FLAGS = ("checkpoint", "hf", "tokenizer", "dtype")
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can act on (a flag, a file, a config key): printed as one line."""


# The project's own user-error classes (HFFormatError, GlueDataError, CompareError, ShardError,
# TokenizerError, InputError, MDSError, ...) all derive from ValueError.
USER_ERRORS = (UserError, ValueError, OSError, app.UsageError, flags.Error)


class QuietOrbaxInfo(logging.logging.Filter):
    """Drops Orbax's INFO chatter (dozens of lines per save or restore); its warnings and
    errors stay."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def is_remote(path: str) -> bool:
    """A bucket path (gs://, s3://): Orbax reads it; os.path can neither check nor create it."""
    return "://" in path


def define_model_source_flags(checkpoint_use: str = "its newest checkpoint"):
    """Defines --checkpoint / --hf / --tokenizer / --dtype; `checkpoint_use` says in --help
    what the tool does with a run's checkpoint."""
    flags.DEFINE_string("checkpoint", None, f"a training run's workdir: {checkpoint_use}")
    flags.DEFINE_string("hf", None, "a transformers directory (config.json + model.safetensors, "
                        "a sharded index or pytorch_model.bin)")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory or tokenizer.json (default: the "
                        "one saved with the run or the transformers directory)")
    flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "compute dtype of the matmuls "
                      "(parameters stay float32); default: the model config's")


@contextlib.contextmanager
def naming_file(path: str):
    """Adds `path` to an OSError raised inside that names no file: a write() or flush() on a
    full disk raises a bare "[Errno 28] No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, path) from e


def error_line(error: BaseException | str) -> str:
    """`error: <message>`; continuation lines of a multi-line message are indented so that the
    output holds exactly one `error:` line."""
    text = str(error).strip() or type(error).__name__
    first, *rest = text.splitlines()
    return "\n".join([f"error: {first}", *(f"  {line}" for line in rest)])


def _config_file_flags(flag_values) -> list:
    """The flags defined with config_flags.DEFINE_config_file."""
    found = {id(flag_values[name]): flag_values[name] for name in flag_values}
    return [flag for flag in found.values()
            if isinstance(flag.parser, config_flags.config_flags.ConfigFileFlagParser)]


def _argv_value(argv: Sequence[str], name: str) -> str | None:
    """The last value given as `--name=value` or `--name value` in argv."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _check_config_files(flag_values, argv: Sequence[str]):
    """A missing config file fails here, naming it: ml_collections would defer the error to the
    first use of the config, deep inside the program."""
    for flag in _config_file_flags(flag_values):
        value = _argv_value(argv, flag.name)
        if value is None:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise UserError(f"--{flag.name}={value}: no config file {path!r} (paths are relative "
                            f"to the working directory {os.getcwd()})")


def _unknown_config_key(flag_values, argv: Sequence[str]) -> str | None:
    """For a `--config.a.b=v` naming no key of the config: a message naming the flag, the
    missing key and the nearest existing keys; None when every override names a key."""
    for flag in _config_file_flags(flag_values):
        value = _argv_value(argv, flag.name)
        if value is None:
            continue
        config = flag.parser.parse(value)
        for arg in argv:
            if not arg.startswith(f"--{flag.name}."):
                continue
            dotted = arg[len(flag.name) + 3:].split("=", 1)[0]
            node, walked = config, []
            for key in dotted.split("."):
                keys = list(node.keys()) if hasattr(node, "keys") else []
                if key not in keys:
                    where = ".".join([flag.name, *walked])
                    close = difflib.get_close_matches(key, [str(k) for k in keys], n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    return (f"{arg.split('=', 1)[0]}: {where} has no key {key!r} "
                            f"(config file {value.split(':', 1)[0]}){hint}")
                node, walked = node[key], [*walked, key]
    return None


def _config_load_error(flag_values, argv: Sequence[str], error: BaseException) -> str | None:
    """A message naming the config file that raised `error` while it loaded, and its line
    where the traceback passes through it; None when no config file flag was given."""
    for flag in _config_file_flags(flag_values):
        value = _argv_value(argv, flag.name)
        if value is None:
            continue
        path = value.split(":", 1)[0]
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
                 if os.path.abspath(frame.filename) == os.path.abspath(path)]
        if isinstance(error, SyntaxError) and error.lineno:
            lines.append(error.lineno)
        where = f", line {lines[-1]}" if lines else ""
        hint = (" (a config file defines get_config(arg))"
                if isinstance(error, AttributeError) and "get_config" in str(error) else "")
        return (f"--{flag.name}={value}: the config file {path}{where} does not load: "
                f"{type(error).__name__}: {error}{hint}")
    return None


def _innermost(error: BaseException) -> BaseException:
    while error.__context__ is not None:
        error = error.__context__
    return error


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with one-line errors (SystemExit 1); returns the positional args."""
    flag_values = flags.FLAGS
    try:
        _check_config_files(flag_values, argv)
        return flag_values(list(argv))
    except UserError as e:
        message = str(e)
    except flags.Error as e:
        message = str(e)
        required = re.fullmatch(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.",
                                message)
        if required:
            message = f"--{required.group(1)} is required (--help lists the flags)"
        # A config file's get_config() that raises: ml_collections wraps the error with its
        # whole traceback in the message; the original exception is the useful line.
        head, sep, _ = message.partition(": Error whilst parsing config file")
        if sep:
            message = f"{head}: {_innermost(e)}"
    except (KeyError, AttributeError, SyntaxError):  # an override of a missing key, or a file
        try:                                          # that does not load (parsed again here)
            message = _unknown_config_key(flag_values, argv)
        except Exception as load_error:  # pylint: disable=broad-exception-caught
            message = _config_load_error(flag_values, argv, load_error)
        if message is None:
            raise
    except ModuleNotFoundError as e:          # a config file importing the `configs` package
        message = (f"{e} (loading a config file: run from the repository root, where the "
                   "`configs` package is)")
    print(error_line(message), file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _print_help(usage: str, full: bool):
    text = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
    print(f"{(usage or '').strip()}\n\nflags:\n{text}\n\n--helpfull lists every flag, "
          "those of the libraries included.")


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None] | None = None,
        *, usage: str = "", user_errors: tuple[type[BaseException], ...] = (),
        positional: bool | str = False, argv: Sequence[str] | None = None):
    """Defines the tool's flags, parses them and runs `main(argv)` under absl (module
    docstring). `user_errors`: more exception classes to print as one `error:` line.
    `positional`: True for a tool that takes arguments besides flags; otherwise any is an
    `error:` line (a str is a hint appended to it)."""
    if define_flags is not None:
        define_flags()
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "on an error, show the traceback of user errors too")
    # Listed in this tool's --help: absl keys the main module's flags by sys.argv[0].
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["verbose"])
    argv = list(sys.argv if argv is None else argv)
    before_separator = argv[:argv.index("--")] if "--" in argv else argv
    help_args = [a for a in before_separator[1:] if a in HELP_ARGS]
    if help_args:
        flags.FLAGS.mark_as_parsed()
        _print_help(usage, full="--helpfull" in help_args)
        sys.exit(0)
    caught = USER_ERRORS + tuple(user_errors)

    def guarded_main(args):
        logging.get_absl_handler().addFilter(QuietOrbaxInfo())
        try:
            if positional is not True and len(args) > 1:
                hint = f"; {positional}" if positional else ""
                raise UserError(f"unexpected arguments {args[1:]}{hint}")
            return main(args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except caught as e:   # pylint: disable=catching-non-exception
            if flags.FLAGS.verbose:
                raise
            print(error_line(e), file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    app.run(guarded_main, argv=argv, flags_parser=_parse_flags)
