"""Encoder vs decoder: check that training runs saw identical data, and chart them side by side.

    python -m ettin_jax.compare RUN [RUN ...] [--out=report] [--glue=RUN=GLUE_WORKDIR ...]

RUN is a training workdir (`main.py --workdir`), or a pair's workdir (an `A+B` config,
ettin_jax.pairs), which stands for its two sides `RUN/mlm` and `RUN/clm`. From each it reads:
  config.json     "size", "objective" ("mlm"/"clm") and "phase" ("pretrain", "ext", "decay",
                  "cross") of the run
  metrics.jsonl   one JSON object per logged step. Used fields (all optional but "step"):
                  step, tokens_seen, loss, accuracy, perplexity, learning_rate,
                  tokens_per_sec, eval_loss, and the data fingerprints of the steps
                  (data_pipeline.fingerprint): "data_fingerprint" (a string: the fingerprint
                  of step `step`) or "data_fingerprints" (a list: the steps since the previous
                  logged line, the last one being `step`). A resumed run logs again from its
                  checkpoint: a line whose step is not after the previous line's replaces the
                  lines from that step on.
  glue/results.json  (optional) `python -m ettin_jax.glue` results for that run; or give
                  --glue=RUN=GLUE_WORKDIR, RUN being the run's directory as given or its name.

Data check: runs are grouped by phase; within a phase every run's fingerprints are compared
step by step with the first run's. Prints "identical data: N steps matched" per phase, or
names the first step where the data differs and exits 1 (the report is still written). With
two or more runs, a phase with a single run, a run without fingerprints or runs with no step
in common cannot be matched: an error. All runs must be of one model size.

Report (--out): PNG charts, each with the data behind it as JSON ({run: {"x": [...],
"y": [...]}}) of the same name: loss and eval_loss vs tokens, accuracy (MLM runs) and
perplexity (CLM runs) vs tokens, learning_rate vs tokens, throughput (tokens/s) vs step;
summary.md (one row per run, see ettin_jax.compare_report) and index.html showing both
(relative links only: it opens offline).

Exit status: 0 on identical data, 1 on differing data or an error (one `error: ...` line on
stderr each: missing files, unreadable lines with file and line number, mixed sizes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from data_pipeline import fingerprint

FINGERPRINT_KEY = "data_fingerprint"
FINGERPRINTS_KEY = "data_fingerprints"
CONFIG_KEYS = ("size", "objective", "phase")


class CompareError(ValueError):
    """A run that cannot be read or compared; the message names the run and the file."""


@dataclasses.dataclass
class Run:
    path: str                        # the directory as given on the command line
    name: str                        # its label in charts and tables
    config: dict                     # config.json
    records: list[dict]              # metrics.jsonl lines, one per logged step, ascending
    fingerprints: dict[int, str]     # step -> data fingerprint
    glue_tasks: list[dict] | None = None   # results.json "tasks", when known

    @property
    def size(self) -> str:
        return str(self.config["size"])

    @property
    def objective(self) -> str:
        return str(self.config["objective"])

    @property
    def phase(self) -> str:
        return str(self.config["phase"])


def _fingerprints_of(record: dict, where: str) -> dict[int, str]:
    step = record["step"]
    if FINGERPRINT_KEY in record:
        value = record[FINGERPRINT_KEY]
        if not isinstance(value, str):
            raise CompareError(f"{where}: \"{FINGERPRINT_KEY}\" must be a string, got "
                               f"{type(value).__name__}")
        return {step: value}
    if FINGERPRINTS_KEY in record:
        values = record[FINGERPRINTS_KEY]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise CompareError(f"{where}: \"{FINGERPRINTS_KEY}\" must be a list of strings")
        first = step - len(values) + 1
        if first < 1:
            raise CompareError(f"{where}: {len(values)} fingerprints end at step {step}: "
                               "more than the steps run")
        return {first + i: v for i, v in enumerate(values)}
    return {}


def read_metrics(path: str) -> tuple[list[dict], dict[int, str]]:
    """(records by ascending step, fingerprints by step) of one metrics.jsonl."""
    records: list[dict] = []
    fingerprints: dict[int, str] = {}
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CompareError(f"{path}:{line_number}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompareError(f"{where}: not a JSON object ({e.msg} at column "
                                   f"{e.colno})") from None
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                raise CompareError(f"{where}: expected a JSON object with an integer \"step\"")
            # Steps after the checkpoint a run resumed from are logged again; the new lines win
            # from the first step they cover. A line of the replaced timeline may end before the
            # new line's step (a stop's line at 105, not saved; the rerun's line at 110 covers
            # 101-110), so it is the new line's first step that cuts, not its last.
            new = _fingerprints_of(record, where)
            first = min(new, default=record["step"])
            if records and records[-1]["step"] >= first:
                while records and records[-1]["step"] >= first:
                    records.pop()
                fingerprints = {step: v for step, v in fingerprints.items() if step < first}
            records.append(record)
            fingerprints.update(new)
    return records, fingerprints


def _read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise CompareError(f"{run_dir}: no config.json (is it a training workdir?)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise CompareError(f"{path}: no {', '.join(missing)} key (written by main.py)")
    return config


def load_run(run_dir: str, name: str) -> Run:
    if not os.path.isdir(run_dir):
        raise CompareError(f"{run_dir}: no such run directory")
    config = _read_config(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise CompareError(f"{run_dir}: no metrics.jsonl (the run has not logged a step yet?)")
    records, fingerprints = read_metrics(path)
    if not records:
        raise CompareError(f"{path}: no logged steps")
    return Run(path=run_dir, name=name, config=config, records=records,
               fingerprints=fingerprints)


def expand_pairs(paths: list[str]) -> list[str]:
    """`paths` with each pair workdir (no config.json of its own, a run in each of mlm/ and
    clm/, as ettin_jax.pairs writes it) replaced by its two sides."""
    expanded = []
    for path in paths:
        sides = [os.path.join(path, objective) for objective in fingerprint.OBJECTIVES]
        if (not os.path.isfile(os.path.join(path, "config.json"))
                and all(os.path.isfile(os.path.join(s, "config.json")) for s in sides)):
            expanded.extend(sides)
        else:
            expanded.append(path)
    return expanded


def run_names(paths: list[str]) -> list[str]:
    """Directory base names, or the paths as given when two base names collide."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return names if len(set(names)) == len(names) else [os.path.normpath(p) for p in paths]


def read_glue(path: str) -> list[dict]:
    """The per-task summaries ("task", "best": {"score", ...}) of a GLUE results.json."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    tasks = results.get("tasks") if isinstance(results, dict) else None
    if not isinstance(tasks, list) or not all(
            isinstance(t, dict) and "task" in t and isinstance(t.get("best"), dict)
            and isinstance(t["best"].get("score"), (int, float)) for t in tasks):
        raise CompareError(f"{path}: expected {{\"tasks\": [{{\"task\", \"best\": {{\"score\"}}}}]}}"
                           " as `python -m ettin_jax.glue` writes")
    return tasks


def attach_glue(runs: list[Run], specs: list[str]) -> None:
    """--glue=RUN=GLUE_WORKDIR specs first, else <run>/glue/results.json when it exists."""
    given = {}
    for spec in specs:
        key, sep, workdir = spec.partition("=")
        matches = [r for r in runs if key in (r.path, r.name, os.path.normpath(r.path))]
        if not sep or not key or len(matches) != 1:
            raise CompareError(f"--glue={spec}: expected RUN=GLUE_WORKDIR with RUN one of "
                               f"{[r.name for r in runs]}")
        path = os.path.join(workdir, "results.json")
        if not os.path.isfile(path):
            raise CompareError(f"--glue={spec}: no {path} (run `python -m ettin_jax.glue "
                               f"--workdir={workdir}` first)")
        given[matches[0].name] = path
    for run in runs:
        path = given.get(run.name, os.path.join(run.path, "glue", "results.json"))
        if os.path.isfile(path):
            run.glue_tasks = read_glue(path)


def check_sizes(runs: list[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.size != first.size:
            raise CompareError(f"{run.path}: size {run.size!r}, but {first.path} is "
                               f"{first.size!r}: compare runs of one model size")


def group_by_phase(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.phase, []).append(run)
    return groups


def check_data(runs: list[Run]) -> tuple[bool, list[str]]:
    """(all identical, one message line per phase); CompareError when runs cannot be matched."""
    if len(runs) < 2:
        return True, [f"{runs[0].name}: a single run, no data to compare"]
    identical, lines = True, []
    for phase, group in group_by_phase(runs).items():
        if len(group) < 2:
            raise CompareError(f"{group[0].path}: the only run of phase {phase!r}; give the "
                               "runs it should be compared with (same phase), or leave it out")
        for run in group:
            if not run.fingerprints:
                raise CompareError(f"{run.path}: metrics.jsonl has no \"{FINGERPRINT_KEY}\" or "
                                   f"\"{FINGERPRINTS_KEY}\": its data cannot be matched")
        reference = group[0]
        for run in group[1:]:
            common = sorted(reference.fingerprints.keys() & run.fingerprints.keys())
            if not common:
                raise CompareError(f"{run.path}: no fingerprinted step in common with "
                                   f"{reference.path} (phase {phase!r})")
            differ = [s for s in common if reference.fingerprints[s] != run.fingerprints[s]]
            if differ:
                s = differ[0]
                identical = False
                lines.append(f"phase {phase}: {reference.name} vs {run.name}: data differs at "
                             f"step {s} ({reference.fingerprints[s]} vs {run.fingerprints[s]}); "
                             f"{len(differ)} of {len(common)} steps differ")
            else:
                lines.append(f"phase {phase}: {reference.name} vs {run.name}: identical data: "
                             f"{len(common)} steps matched")
    return identical, lines


def compare(run_dirs: list[str], out_dir: str, glue_specs: list[str] = ()) -> int:
    """Reads, checks and reports (module docstring); returns the exit status."""
    from ettin_jax import compare_report  # pylint: disable=import-outside-toplevel
    if not run_dirs:
        print("error: give at least one RUN directory", file=sys.stderr)
        return 1
    run_dirs = expand_pairs(run_dirs)
    runs, errors = [], []
    for run_dir, name in zip(run_dirs, run_names(run_dirs)):
        try:
            runs.append(load_run(run_dir, name))
        except (CompareError, OSError) as e:
            errors.append(str(e))
    try:
        if not errors:
            check_sizes(runs)
            attach_glue(runs, list(glue_specs))
            identical, lines = check_data(runs)
    except (CompareError, OSError) as e:
        errors.append(str(e))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        return 1
    for line in lines:
        print(line)
    index = compare_report.write_report(runs, out_dir, data_lines=lines)
    print(f"report: {index}")
    return 0 if identical else 1


def define_flags():
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("out", "report", "directory for the charts, summary.md and index.html")
    flags.DEFINE_multi_string("glue", [], "RUN=GLUE_WORKDIR: GLUE results of a run (default: "
                              "<RUN>/glue/results.json when present); repeat per run")


def main(argv):
    from absl import flags  # pylint: disable=import-outside-toplevel
    return compare(list(argv[1:]), flags.FLAGS.out, flags.FLAGS.glue)


if __name__ == "__main__":
    from ettin_jax import cli
    cli.run(main, define_flags, usage=__doc__, positional=True)
