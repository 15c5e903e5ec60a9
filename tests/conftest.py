"""Test-wide setup, done before jax is imported (subprocesses inherit the environment):
four host CPU devices for the sharding tests, a compilation cache shared by every test and
subprocess of this run, and the repository root on sys.path so `configs.*` imports work."""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same tiny models and train steps many times over (fresh jit wrappers,
# main.py subprocesses): a persistent cache turns repeat compilations into disk reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ettin-jax-test-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
