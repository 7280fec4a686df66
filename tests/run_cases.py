"""What the tests of whole runs compare (metrics rows without times, client states, two runs), and tiny h5 data."""

from __future__ import annotations

import h5py
import numpy as np
import torch


def without_times(rows: list[dict]) -> list[dict]:
    """Rows without ``time/*``: wall-clock seconds and samples per second differ between any two runs."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def same_states(a, b) -> bool:
    """The same clients, in the same order, each with the same tensors bit for bit."""
    return list(a) == list(b) and all(a[c].keys() == b[c].keys() and all(torch.equal(a[c][k], b[c][k]) for k in a[c])
                                      for c in a)


def metrics_lines_after_first_checkpoint(output_dir) -> int:
    """Lines of the one run under ``output_dir`` once it has a checkpoint (0 before): how far a run to kill has got."""
    run_dir = next(output_dir.iterdir(), None) if output_dir.exists() else None
    if run_dir is None or not (run_dir / "checkpoint.pt").exists():
        return 0
    return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")


def assert_same_run(result, expected) -> None:
    """Two RunResults with the same metrics, weights, evaluation and client states."""
    assert without_times(result.history) == without_times(expected.history)
    assert all(torch.equal(result.weights[k], expected.weights[k]) for k in expected.weights)
    assert result.report == expected.report
    assert same_states(result.client_states, expected.client_states)


def regression_clients(count: int = 10, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Sites of 12 examples whose targets are their 3 inputs times each site's own slope."""
    generator = torch.Generator().manual_seed(seed)
    return {f"site{k:02d}": (x, x @ (torch.tensor([1.0, -2.0, 0.5]) + 0.3 * k))
            for k, x in ((k, torch.randn(12, 3, generator=generator)) for k in range(count))}


def write_tiny_data(root, emnist_names=("femnist_train.h5", "femnist_test.h5"), shakespeare=True):
    """30 writers (6 train, 2 test images each) and 30 roles (3 train, 1 test snippet each)."""
    rng = np.random.default_rng(0)
    (root / "femnist").mkdir(parents=True)
    for name, count in zip(emnist_names, (6, 2)):
        with h5py.File(root / "femnist" / name, "w") as handle:
            for writer in range(30):
                group = f"examples/f{writer:04d}_00"
                handle.create_dataset(f"{group}/pixels", data=rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
                handle.create_dataset(f"{group}/label", data=rng.integers(0, 62, count, dtype=np.int32))
    if shakespeare:
        (root / "shakespeare").mkdir()
        for name, count in (("shakespeare_train.h5", 3), ("shakespeare_test.h5", 1)):
            with h5py.File(root / "shakespeare" / name, "w") as handle:
                for role in range(30):
                    snippets = [f"To be, or not to be {role} {i}: that is the question." for i in range(count)]
                    handle.create_dataset(f"examples/PLAY_ROLE{role}/snippets", data=np.array(snippets, dtype=bytes))
    return root
