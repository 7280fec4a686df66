"""Runs every system on every workload, side by side in one invocation, and reports ratios.

    python -m benchmarks.run                      # everything: W1-W4, variants, peers, sweep
    python -m benchmarks.run --workloads W1 --systems fedmeta,reference
    python -m benchmarks.report benchmarks/results/latest.json   # table + plot again

Each (workload, system) runs in a fresh process tree; this driver records the launch
time, samples the memory of the whole tree (RSS summed, and PSS, which counts pages
shared between processes once), and reads the system's ``BENCH_RESULT`` line.
Systems of a workload run one after another, so each has the machine to itself, and
the order alternates between repeats so that slow drift does not favour one system.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import DEFAULT_DATA_DIR, REPO_ROOT, RESULT_PREFIX, SWEEP_POPULATIONS, WORKLOADS, \
    Workload, workload_by_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEERS = ("pfl", "flower")
FEDMETA_VARIANTS = {
    "fedmeta": [],
    "fedmeta-nchw": ["--default-layout"],
    "fedmeta-bf16": ["--bfloat16", "true"],
    "fedmeta-auto": ["--bfloat16", "auto"],
    "fedmeta-inprocess": ["--workers", "0"],
}
LOCAL_SYSTEMS = {"reference": "benchmarks.systems.reference", "naive": "benchmarks.systems.naive"}
VARIANT_WORKLOADS = ("W1",)  # where the fedmeta variants (layout, precision, in-process) run
SWEEP_SYSTEMS = ("fedmeta", "naive")


class Unavailable(Exception):
    """A system that cannot run a workload here, with the reason."""


def command(system: str, workload: Workload, workers: int, data_dir: Path) -> list[str]:
    if workload.method != "fedavg" and system not in FEDMETA_VARIANTS:
        raise Unavailable(f"{workload.method} is fedmeta's alone here")
    common = ["--workload", workload.name, "--data-dir", str(data_dir)]
    if system in FEDMETA_VARIANTS:
        extra = FEDMETA_VARIANTS[system]
        count = [] if "--workers" in extra else ["--workers", str(workers)]
        return [sys.executable, "-m", "benchmarks.systems.fedmeta_system", *common, *count, *extra]
    if system in LOCAL_SYSTEMS:
        return [sys.executable, "-m", LOCAL_SYSTEMS[system], *common, "--workers", str(workers)]
    from benchmarks.peers.launch import Unsupported, command as peer_command

    try:
        return peer_command(system, workload, workers, data_dir, REPO_ROOT)
    except Unsupported as reason:
        raise Unavailable(str(reason)) from None


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of ``root`` and all its descendants."""
    rss = pss = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def run_one(argv: list[str], timeout: float) -> dict:
    """Runs one system; returns its result with start-up seconds and peak memory added."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # this checkout's fedmeta, whichever one a peer's virtualenv has installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]
                                        ).rstrip(os.pathsep)
    launched = time.time()
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def watch() -> None:
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                rss, pss = tree_memory(root)
            except psutil.NoSuchProcess:
                return
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "output_tail": output[-2000:]}
    finally:
        done.set()
        watcher.join()
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        return {"error": f"exit code {process.returncode}, no result", "output_tail": output[-2000:]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result.update(
        samples_per_second=result["samples"] / result["seconds"],
        seconds_per_round=result["seconds"] / result["rounds"],
        startup_seconds=result["first_round_wall"] - launched,
        peak_rss_mb=peak["rss"] / 2**20,
        peak_pss_mb=peak["pss"] / 2**20,
    )
    return result


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def plan(workloads: list[str], systems: list[str], sweep: bool) -> list[tuple[str, str]]:
    pairs = []
    for name in workloads:
        for system in systems:
            if system in FEDMETA_VARIANTS and system != "fedmeta" and name not in VARIANT_WORKLOADS:
                continue
            pairs.append((name, system))
    if sweep:
        pairs += [(f"S{p}", s) for p in SWEEP_POPULATIONS for s in SWEEP_SYSTEMS if s in systems]
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default=",".join([*FEDMETA_VARIANTS, *LOCAL_SYSTEMS, *PEERS]))
    parser.add_argument("--no-sweep", action="store_true", help="skip the synthetic population sweep")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pair; the best is reported")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args()
    for name in args.workloads.split(","):
        workload_by_name(name)

    started = time.time()
    runs = []
    pairs = plan(args.workloads.split(","), args.systems.split(","), not args.no_sweep)
    for repeat in range(args.repeats):
        for name, system in (pairs if repeat % 2 == 0 else pairs[::-1]):
            workload = workload_by_name(name)
            try:
                argv = command(system, workload, args.workers, args.data_dir)
            except Unavailable as reason:
                runs.append({"system": system, "workload": name, "unsupported": str(reason)})
                print(f"{name:6} {system:18} unsupported: {reason}", flush=True)
                continue
            result = run_one(argv, args.timeout)
            result.update(system=system, workload=name, repeat=repeat)
            runs.append(result)
            if "error" in result:
                print(f"{name:6} {system:18} FAILED: {result['error']}\n{result['output_tail']}", flush=True)
            else:
                print(f"{name:6} {system:18} {result['samples_per_second']:8.1f} samples/s "
                      f"{result['seconds_per_round']:7.2f} s/round  start-up {result['startup_seconds']:5.1f} s  "
                      f"RSS {result['peak_rss_mb']:6.0f} MB  PSS {result['peak_pss_mb']:6.0f} MB", flush=True)
    report = {"machine": machine(), "command": " ".join(sys.argv), "workers": args.workers,
              "total_seconds": time.time() - started, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    from benchmarks.report import write_report

    print(write_report(report, args.out.with_suffix("")))


if __name__ == "__main__":
    main()
