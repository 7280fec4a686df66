import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real federated files: $FEDMETA_SHARED_DATA, or ../shared/data beside the repository."""
    root = Path(os.environ.get("FEDMETA_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (root / "femnist" / "femnist_train.h5").is_file():
        pytest.skip(f"shared data not found at {root}")
    return root
