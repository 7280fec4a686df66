"""The reference: plain single-threaded PyTorch, one process per core, no federated machinery.

It trains the very batches fedmeta's clients draw (``client_batches``), split evenly
across the processes by samples, on one model per process with the default layout
and precision: what these kernels give with zero overhead and perfect load balance.
A personalization workload also runs each client's test evaluations.
"""

from __future__ import annotations

import multiprocessing
import time

import torch
import torch.nn.functional as F

from benchmarks.common import Result, build_workload_model, client_batches, cohorts, emit, load_population, \
    parse_args, round_index, samples_of, workload_by_name

IGNORE_INDEX = -100


def jobs_of(workload, clients, cohort_ids, seed, position):
    """(client id, batch or None for a test evaluation) in the order a client would run them."""
    jobs = []
    for cid in cohort_ids:
        batches = client_batches(workload, clients[cid], seed, round_index(workload, position))
        if workload.kind == "personalize":
            per_epoch = len(batches) // workload.epochs
            jobs.append((cid, None))
            for epoch in range(workload.epochs):
                jobs.extend((cid, b) for b in batches[epoch * per_epoch:(epoch + 1) * per_epoch])
                jobs.append((cid, None))
        else:
            jobs.extend((cid, b) for b in batches)
    return jobs


def split_evenly(jobs, clients, parts: int):
    """Cuts the job list into ``parts`` runs of about equal work (samples)."""
    cost = [len(b) if b is not None else len(clients[cid].test) // 3 for cid, b in jobs]
    total, shares, start, done = sum(cost), [], 0, 0
    for part in range(1, parts + 1):
        end = start
        while end < len(jobs) and (part == parts or done + cost[end] <= total * part / parts):
            done += cost[end]
            end += 1
        shares.append(jobs[start:end])
        start = end
    return shares


def train(model, optimizer, clients, jobs) -> None:
    for cid, batch in jobs:
        client = clients[cid]
        if batch is None:
            with torch.no_grad():
                model(client.test.x)
            continue
        optimizer.zero_grad(set_to_none=True)
        logits = model(client.train.x[batch])
        targets = client.train.y[batch].reshape(-1)
        F.cross_entropy(logits.reshape(targets.shape[0], -1), targets, ignore_index=IGNORE_INDEX).backward()
        optimizer.step()


def run_share(workload, clients, num_classes, warm, measured, barrier, finished) -> None:
    torch.set_num_threads(1)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.client_lr)
    train(model, optimizer, clients, warm)
    barrier.wait()
    train(model, optimizer, clients, measured)
    finished.put(time.perf_counter())


def main() -> None:
    args = parse_args(__doc__)
    workload = workload_by_name(args.workload)
    clients, num_classes = load_population(workload, args.data_dir)
    rounds = cohorts(workload, list(clients), args.seed)
    warm = [j for p, ids in enumerate(rounds[:workload.warmup_rounds])
            for j in jobs_of(workload, clients, ids, args.seed, p)]
    measured_rounds = list(enumerate(rounds))[workload.warmup_rounds:]
    measured = [j for p, ids in measured_rounds for j in jobs_of(workload, clients, ids, args.seed, p)]
    context = multiprocessing.get_context("fork")
    barrier, finished = context.Barrier(args.workers + 1), context.Queue()
    first_round_wall = time.time()
    processes = [
        context.Process(target=run_share, args=(workload, clients, num_classes, w, m, barrier, finished))
        for w, m in zip(split_evenly(warm, clients, args.workers), split_evenly(measured, clients, args.workers))
    ]
    for process in processes:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    seconds = max(finished.get() for _ in processes) - started
    for process in processes:
        process.join()
    samples = sum(samples_of(workload, [clients[c] for c in ids]) for _, ids in measured_rounds)
    emit(Result("reference", workload.name, samples, seconds, workload.rounds, first_round_wall,
                f"{args.workers} processes"))


if __name__ == "__main__":
    main()
