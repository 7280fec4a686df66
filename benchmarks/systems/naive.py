"""A naive loop, as most research code runs FedAvg: one process, default threads, a deep
copy of the global model per client, state dicts averaged in Python."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from benchmarks.common import Result, build_workload_model, client_batches, cohorts, emit, load_population, \
    parse_args, round_index, samples_of, workload_by_name


def local_training(model, client, batches, lr: float) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batches:
        optimizer.zero_grad()
        targets = client.train.y[batch].reshape(-1)
        logits = model(client.train.x[batch])
        F.cross_entropy(logits.reshape(targets.shape[0], -1), targets, ignore_index=-100).backward()
        optimizer.step()


def personalize(model, client, batches, workload) -> None:
    local = copy.deepcopy(model)
    per_epoch = len(batches) // workload.epochs
    with torch.no_grad():
        local(client.test.x)
    for epoch in range(workload.epochs):
        local_training(local, client, batches[epoch * per_epoch:(epoch + 1) * per_epoch], workload.client_lr)
        with torch.no_grad():
            local(client.test.x)


def fedavg_round(model, cohort, batches, workload) -> None:
    states, sizes = [], []
    for client, client_batches_ in zip(cohort, batches):
        local = copy.deepcopy(model)
        local_training(local, client, client_batches_, workload.client_lr)
        states.append(local.state_dict())
        sizes.append(len(client.train))
    total = sum(sizes)
    model.load_state_dict({k: sum(s[k] * (n / total) for s, n in zip(states, sizes)) for k in states[0]})


def main() -> None:
    args = parse_args(__doc__)
    workload = workload_by_name(args.workload)
    clients, num_classes = load_population(workload, args.data_dir)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    seconds, samples = 0.0, 0
    first_round_wall = time.time()
    for position, ids in enumerate(cohorts(workload, list(clients), args.seed)):
        cohort = [clients[c] for c in ids]
        batches = [client_batches(workload, c, args.seed, round_index(workload, position)) for c in cohort]
        started = time.perf_counter()
        if workload.kind == "personalize":
            for client, client_batches_ in zip(cohort, batches):
                personalize(model, client, client_batches_, workload)
        else:
            fedavg_round(model, cohort, batches, workload)
        if position >= workload.warmup_rounds:
            seconds += time.perf_counter() - started
            samples += samples_of(workload, cohort)
    emit(Result("naive", workload.name, samples, seconds, workload.rounds, first_round_wall,
                f"1 process, {torch.get_num_threads()} threads"))


if __name__ == "__main__":
    main()
