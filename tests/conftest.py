"""Test-wide setup: four host CPU devices (for the sharding tests) before jax is imported,
and the repository root on sys.path so `configs.*` imports like main.py's."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
