"""fedmeta itself: rounds of the workload's method (or personalization) through the configured engine."""

from __future__ import annotations

import time

from benchmarks.common import DITTO_LAM, FEDREP_HEAD, Result, Workload, build_workload_model, cohorts, emit, \
    load_population, parse_args, samples_of, workload_by_name
from fedmeta.algorithms.algorithm import FederatedAlgorithm, init_state, run_round
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.presets import ditto, fedavg, fedrep
from fedmeta.algorithms.server_optimizers import server_sgd
from fedmeta.engine import Execution, InProcessEngine, ProcessEngine
from fedmeta.engine.execution import resolve_bfloat16
from fedmeta.evaluation.personalization import personalize
from fedmeta.params import get_weights


def add_options(parser) -> None:
    parser.add_argument("--default-layout", action="store_true", help="keep NCHW convolutions (no channels_last)")
    parser.add_argument("--bfloat16", choices=("false", "true", "auto"), default="false",
                        help="bfloat16 autocast for client work (auto: where the CPU has native bfloat16 units)")


def algorithm(workload: Workload) -> FederatedAlgorithm:
    """The workload's method at its epochs, client lr and batch size, with server SGD of lr 1."""
    common = dict(local_epochs=workload.epochs, client_lr=workload.client_lr, client_batch_size=workload.batch_size,
                  server_optimizer=server_sgd(1.0))
    if workload.method == "ditto":
        return ditto(DITTO_LAM, **common)
    if workload.method == "fedrep":
        return fedrep(FEDREP_HEAD[workload.model], head_epochs=workload.epochs, **common)
    return fedavg(**common)


def main() -> None:
    args = parse_args(__doc__, add_options)
    workload = workload_by_name(args.workload)
    clients, num_classes = load_population(workload, args.data_dir)
    model = build_workload_model(workload, num_classes, next(iter(clients.values())).train)
    weights = get_weights(model)
    bfloat16 = resolve_bfloat16({"true": True, "false": False}.get(args.bfloat16, "auto"), "cpu")
    execution = Execution(channels_last=not args.default_layout, bfloat16=bfloat16)
    engine = (InProcessEngine(model, execution) if args.workers == 0
              else ProcessEngine(model, clients, workers=args.workers, execution=execution))
    rounds = [[clients[c] for c in ids] for ids in cohorts(workload, list(clients), args.seed)]
    first_round_wall = time.time()
    with engine:
        if workload.kind == "personalize":
            started = time.perf_counter()
            personalize(weights, rounds[0], local_sgd(workload.client_lr, workload.batch_size, epochs=workload.epochs),
                        engine=engine, seed=args.seed)
            seconds = time.perf_counter() - started
            samples = samples_of(workload, rounds[0])
        else:
            schedule = algorithm(workload)
            state = init_state(schedule, weights)
            seconds, samples = 0.0, 0
            for round_idx, cohort in enumerate(rounds):
                started = time.perf_counter()
                state, _ = run_round(schedule, state, cohort, engine=engine, seed=args.seed, round_idx=round_idx)
                if round_idx >= workload.warmup_rounds:
                    seconds += time.perf_counter() - started
                    samples += samples_of(workload, cohort)
    note = "" if workload.method == "fedavg" else f"{schedule.name}, "
    note += "in-process" if args.workers == 0 else f"{args.workers} workers"
    note += ", NCHW" if args.default_layout else ", channels_last"
    note += (", bfloat16" if bfloat16 else "") + (f" (auto: {'on' if bfloat16 else 'off'} on this CPU)"
                                                 if args.bfloat16 == "auto" else "")
    emit(Result("fedmeta", workload.name, samples, seconds, workload.rounds, first_round_wall, note))


if __name__ == "__main__":
    main()
