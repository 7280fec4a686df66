"""Soak run: many rounds with client faults switched on, memory sampled as it goes.

    python -m benchmarks.soak                       # 20,000 rounds, about 2.5 min on 2 cores
    python -m benchmarks.soak --rounds 500 --out soak-results

A real ``fedmeta`` run (process engine, checkpoints, metrics.jsonl, evaluations) on
synthetic clients with dropout, lognormal stragglers against a deadline, the
update-norm check and ``min_clients`` with retries. A thread samples the RSS and PSS
of the whole process tree every second; the report fits a line to memory against
rounds after the first tenth (start-up) and says how much memory grew per 1,000 rounds.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.run import RESULTS_DIR, tree_memory
from fedmeta.experiment.config import config_from_dict
from fedmeta.experiment.run import run_experiment

FAULTS = {"dropout": 0.2, "seconds_per_example": 0.01, "slowdown_sigma": 1.0, "round_deadline": 2.0,
          "min_clients": 4, "policy": "retry", "max_retries": 2, "update_norm_factor": 5.0}


def soak_config(rounds: int, output_dir: Path) -> dict:
    return {
        "name": "soak", "seed": 0, "rounds": rounds, "output_dir": str(output_dir), "checkpoint_every": 50,
        "data": {"kind": "synthetic", "num_clients": 400},
        "algorithm": {"name": "fedavg", "cohort_size": 10, "local_epochs": 1},
        "evaluation": {"every": max(rounds // 10, 1), "max_clients": 40, "fine_tune_epochs": 1},
        "faults": FAULTS,
    }


def growth_per_thousand_rounds(samples: list[dict], key: str) -> float:
    """MB per 1,000 rounds of a least-squares line through the samples after the first tenth."""
    last_round = samples[-1]["round"]
    kept = [s for s in samples if s["round"] >= last_round / 10]
    slope = np.polyfit([s["round"] for s in kept], [s[key] for s in kept], 1)[0]
    return float(slope * 1000)


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    rounds = [s["round"] for s in samples]
    ax.plot(rounds, [s["rss_mb"] for s in samples], label="RSS, summed over processes")
    ax.plot(rounds, [s["pss_mb"] for s in samples], label="PSS (shared pages counted once)")
    ax.set(xlabel="rounds done", ylabel="MB", ylim=(0, None), title="Soak run with client faults: memory")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = config_from_dict(soak_config(args.rounds, args.out / "runs"))

    samples: list[dict] = []
    done = threading.Event()
    run_dir: list[Path] = []

    def rounds_done() -> int:
        if not run_dir:
            found = sorted((args.out / "runs").glob("soak-*/metrics.jsonl"))
            if not found:
                return 0
            run_dir.append(found[-1])
        with open(run_dir[0], "rb") as metrics:
            return sum(1 for _ in metrics)

    def watch() -> None:
        me = psutil.Process()
        started = time.perf_counter()
        while not done.wait(1.0):
            rss, pss = tree_memory(me)
            samples.append({"seconds": time.perf_counter() - started, "round": rounds_done(),
                            "rss_mb": rss / 2**20, "pss_mb": pss / 2**20})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    result = run_experiment(config, progress=False)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()

    history = result.history
    faults = {key: sum(row.get(f"faults/{key}", 0) for row in history)
              for key in ("dropped", "stragglers", "failed", "rejected", "retries", "skipped")}
    report = {
        "rounds": len(history), "seconds": seconds, "run_dir": str(result.run_dir), "faults_config": FAULTS,
        "faults": faults, "clients_aggregated": sum(row["client/num_clients"] for row in history
                                                    if not row.get("faults/skipped")),
        "rss_mb_first_tenth_end": next(s["rss_mb"] for s in samples if s["round"] >= len(history) / 10),
        "rss_mb_peak": max(s["rss_mb"] for s in samples), "rss_mb_last": samples[-1]["rss_mb"],
        "rss_mb_per_1000_rounds": growth_per_thousand_rounds(samples, "rss_mb"),
        "pss_mb_per_1000_rounds": growth_per_thousand_rounds(samples, "pss_mb"),
        "samples": samples,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(samples, args.out / "soak.png")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
