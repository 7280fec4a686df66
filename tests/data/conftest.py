"""The real federated files in ``../shared/data`` (see its README), for loader tests."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """$FEDMETA_SHARED_DATA, or ``shared/data`` beside the repository; skips the test if absent."""
    root = Path(os.environ.get("FEDMETA_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (root / "femnist" / "femnist_train.h5").is_file():
        pytest.skip(f"shared data not found at {root}")
    return root
