"""Shared set-up: no hub access anywhere, and every cache in a temp folder."""

import os
import tempfile

# Set before anything imports huggingface_hub, which reads these once at import time.
_home = tempfile.mkdtemp(prefix="l2s-test-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _home
os.environ["HF_HUB_CACHE"] = os.path.join(_home, "hub")
# The offline suite runs on the CPU on every machine (a GPU machine would otherwise default to
# CUDA fp16, other numerics); tests marked gpu place their models on CUDA themselves.
os.environ["L2S_DEVICE"] = "cpu"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _l2s_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("L2S_CACHE_DIR", str(tmp_path_factory.mktemp("l2s_cache")))


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny models only pay start-up for more, and two
    threads stall in OpenMP barriers on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def den():
    """A tiny SD-shaped denoiser (``l2s.families.tiny``, random weights, CPU), one per test
    module; a module that needs another backbone defines its own ``den``."""
    from l2s.families.tiny import tiny_sd

    return tiny_sd()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk.arm(n, errno.ENOSPC)``: the n-th file write from then on, and every later
    one, fails as on a full disk (``errno.EROFS``: a read-only one); ``disarm()`` frees it
    (``tests/faults.py``)."""
    from faults import DiskFaults

    return DiskFaults(monkeypatch)


@pytest.fixture
def corrupt():
    """``corrupt(folder, n, how, pattern)``: damage the n-th file of an output folder (flip a
    bit, truncate, zero, delete; ``tests/faults.py``)."""
    from faults import corrupt_nth

    return corrupt_nth
