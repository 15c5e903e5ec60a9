"""Test-wide setup, done before jax is imported (subprocesses inherit the environment):
four host CPU devices for the sharding tests, a compilation cache shared by every test and
subprocess of this run, and the repository root on sys.path so `configs.*` imports work;
at the end, a quick exit for xdist workers (pytest_sessionfinish). Fixtures used by several
test files live here."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

# XLA:CPU's backend (LLVM) optimisation off: the suite is compile-bound and its programs run
# for milliseconds; test_scan.py + test_model.py take 173 s instead of 240 s.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same tiny models and train steps many times over (fresh jit wrappers,
# main.py subprocesses): a persistent cache turns repeat compilations into disk reads. The
# process that makes it (pytest's, before xdist starts its workers with this environment)
# removes it at exit: a run of the suite left ~30 MB in the temp directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ettin-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_sessionfinish(session):
    """Frees the session's compiled programs and settles garbage collection before an xdist
    worker reports that it has finished. Afterwards pytest runs five full collections (to find
    unraisable exceptions) while execnet gives the worker 5 s before it sends the worker a
    SIGINT; with the jit caches of a whole worker alive (over a million objects) each took
    about a second, and the SIGINT then surfaced as a KeyboardInterrupt inside jax's GC
    callback after the last test. Freezing the survivors leaves those collections little to
    scan; what is garbage now is collected here, while pytest still reports it."""
    import gc  # pylint: disable=import-outside-toplevel
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(tokenizer_dir, shards_dir) of data_pipeline.demo_corpus built for the tiny config's layout
    (vocab 512, [UNK] 500), once per test file that asks for it."""
    from data_pipeline import demo_corpus  # pylint: disable=import-outside-toplevel
    import train_testlib  # pylint: disable=import-outside-toplevel
    size = train_testlib.DEMO_MAX_BYTES
    # the directory configure derives for that layout and size
    out = demo_corpus.build_dir(str(tmp_path_factory.mktemp("demo")), 512, 500, size)
    return demo_corpus.build(out, vocab_size=512, unk_id=500, max_bytes=size)
