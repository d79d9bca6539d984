import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDGEDIAG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_data(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not present (../shared/data beside the project)")
    return path


def run_cli(*args, timeout=600, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` as a user would; capture text output."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture
def one_thread():
    """One intra-op thread: the models these tests build are small, and on a shared CPU
    extra threads only wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
