"""A real single-node SLURM for the grid's SLURM tests: the one already answering, else started by `.ci/slurm up`."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import REPO

CLUSTER_SCRIPT = REPO / ".ci" / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def answers() -> bool:
    """SLURM's controller answers this shell (its config found through SLURM_CONF or the system's)."""
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def unavailable(reason: str) -> None:
    """Skip here; in CI (CI set) a SLURM test that cannot run is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the SLURM tests must run; `.ci/run` installs and starts SLURM)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """A SLURM cluster for the session; started here (and stopped at the end) only if none answers."""
    if answers():
        yield
        return
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        unavailable(f"SLURM is not installed ({', '.join(missing)} missing); `.ci/slurm install` (as root) installs it")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", subprocess.run([CLUSTER_SCRIPT, "conf"], capture_output=True, text=True, check=True).stdout.strip())
        if answers():  # started by `.ci/slurm up` (CI, or by hand) and not yet in this shell's environment
            yield
            return
        if os.geteuid() != 0:
            unavailable("no SLURM answers and starting one (`.ci/slurm up`) needs root")
        started = subprocess.run([CLUSTER_SCRIPT, "up"], capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            pytest.fail(f".ci/slurm up failed: {started.stderr.strip() or started.stdout.strip()}")
        try:
            yield
        finally:
            subprocess.run([CLUSTER_SCRIPT, "down"], capture_output=True, timeout=120)
