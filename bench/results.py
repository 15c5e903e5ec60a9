"""How the bench scripts write down what they measured: a Markdown table in bench/RESULTS.md,
headed by what ran (the exact command) and where (card or CPU, jax version, date).

    results.define_flags()      # --results (off: print only), --results_file, --note
    results.append(title, columns, rows, where=results.machine())
    results.append(title, columns, rows, continue_table=True)   # one-row-per-run tables

Every script prints its figures; only --results writes them, so a quick look does not add
to the record. A script whose table gets a row per run (train_step, loader) continues its
table while it is the file's last section, and starts a new one once another script wrote
below it.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

from absl import flags

RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def define_flags():
    flags.DEFINE_bool("results", False, "append the figures to --results_file")
    flags.DEFINE_string("results_file", RESULTS_MD, "the Markdown file --results appends to")
    flags.DEFINE_string("note", "", "free text written under the table's heading")


def command() -> str:
    """This process's command line, as a user would retype it."""
    return "python " + shlex.join(sys.argv)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine(device: bool = True) -> str:
    """Where the figures come from: the card's name on an accelerator; on CPU (or with
    device=False, for host-side work such as the data loader) the core count and load, since
    a loaded 2-core machine halves a CPU figure. Then Python (and jax, with device)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    host = f"{os.cpu_count()}-core {platform.machine()} CPU, load {load:.1f}"
    if not device:
        return f"{host}, Python {platform.python_version()}"
    import jax  # pylint: disable=import-outside-toplevel
    kind = jax.devices()[0]
    where = host if kind.platform == "cpu" else kind.device_kind
    return f"{where}, Python {platform.python_version()}, jax {jax.__version__}"


def _last_heading(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        headings = [line.rstrip("\n") for line in f if line.startswith("## ")]
    return headings[-1] if headings else None


def append(title: str, columns: list, rows: list, *, where: str = "", note: str = "",
           path: str | None = None, continue_table: bool = False,
           commands: str = "") -> str:
    """Appends `rows` (lists of cells) under `## {title}` to `path` (default --results_file);
    returns the path. The heading is followed by `where`, the command (or `commands`, for
    figures several runs made) and `note`.

    continue_table: for tables with a row per run, whose rows name their own machine and
    command: no such line; while `## {title}` is the file's last heading only the rows are
    written."""
    path = path or flags.FLAGS.results_file
    lines = [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    heading = f"## {title}"
    if not (continue_table and _last_heading(path) == heading):
        table = [f"| {' | '.join(columns)} |", "|" + " --- |" * len(columns)]
        if continue_table:
            lines = ["", heading, "", *table, *lines]
        else:
            preamble = " ".join(part for part in (
                where and f"{where}.", commands or f"Command: `{command()}`.", note) if part)
            lines = ["", heading, "", preamble, "", *table, *lines]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended {len(rows)} row(s) to {path}")
    return path
