"""bench/results.py: the one way bench scripts write their figures to bench/RESULTS.md."""
import os
import subprocess
import sys

from bench import loader as loader_bench
from bench import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sections(path):
    """[(heading, [table rows without the header and rule])] of a Markdown results file."""
    sections = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            if line.startswith("## "):
                sections.append((line[3:], []))
            elif line.startswith("| ") and sections and set(line) - set("|- "):
                sections[-1][1].append(line)
    return [(heading, rows[1:]) for heading, rows in sections]   # rows[0]: the column names


def test_a_per_run_table_continues_until_another_section_is_written_below_it(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Results\n\n## older section\n\n| a |\n| --- |\n| 1 |\n")
    title, columns = "loader rows", ["run", "tokens/s"]
    results.append(title, columns, [["x", 1]], path=path, continue_table=True)
    results.append(title, columns, [["y", 2], ["z", 3]], path=path, continue_table=True)
    results.append("a one-off table", ["k"], [["v"]], where="somewhere", path=path)
    results.append(title, columns, [["w", 4]], path=path, continue_table=True)
    assert _sections(path) == [
        ("older section", ["| 1 |"]),
        ("loader rows", ["| x | 1 |", "| y | 2 |", "| z | 3 |"]),
        ("a one-off table", ["| v |"]),
        ("loader rows", ["| w | 4 |"])]


def test_a_one_off_table_says_where_and_how_it_was_measured(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    results.append("t", ["a", "b"], [[1, 2]], where="H200, jax 0.11.2", note="cold cache",
                   path=path)
    results.append("t", ["a", "b"], [[3, 4]], where="H200, jax 0.11.2", path=path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.count("## t\n") == 2                 # without continue_table: a new section each
    assert f"H200, jax 0.11.2. Command: `{results.command()}`. cold cache\n" in text
    assert "| a | b |\n| --- | --- |\n| 1 | 2 |\n" in text


def test_machine_names_the_cores_and_versions():
    import jax  # pylint: disable=import-outside-toplevel
    assert results.machine(device=False).startswith(f"{os.cpu_count()}-core ")
    assert results.machine().endswith(f"jax {jax.__version__}")


def test_loader_bench_writes_only_with_results(tmp_path):
    """bench/loader.py end to end on a small corpus: it prints its row always, and appends it
    (continuing its table) only with --results."""
    target = tmp_path / "RESULTS.md"
    command = [sys.executable, "bench/loader.py", "--config=configs/ettin_tiny.py:mlm",
               "--batches=2", "--rows=4", "--documents=60", "--seq_len=128", "--workers=0",
               f"--results_file={target}"]
    for extra in ([], ["--results"], ["--results", "--note=second"]):
        done = subprocess.run(command + extra, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "tokens/s: " in done.stdout
        if not extra:
            assert not target.exists()
    [(heading, rows)] = _sections(str(target))
    assert heading == loader_bench.TITLE
    assert len(rows) == 2 and rows[1].endswith("--note=second` second |")

