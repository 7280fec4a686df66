"""The report's *Why the gap* studies, computed from the findings: the class mix, careful fine-tuning and writer
size, each a table's rows, and one sentence per study for the section's opening.

Pure like ``findings``: the writer-count study is a verdict there (``gain_grows_with_writers``);
the others describe rather than decide, so they have tables and sentences but no verdict.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from fedmeta.experiment.reproduce import plan, verdicts
from fedmeta.experiment.reproduce.findings import Findings, SeededRuns, accuracy_cell, smoothed
from fedmeta.experiment.reproduce.paper import TFF_DIGIT_SHARE, paper_row
from fedmeta.experiment.reproduce.runs import RunRecord
from fedmeta.experiment.reproduce.verdicts import Accuracies


class GroupAccuracy(NamedTuple):
    """Mean accuracy on one kind of character, before and after personalizing."""

    initial: float
    personalized: float

    @property
    def gain(self) -> float:
        return self.personalized - self.initial


def group_accuracy(runs: SeededRuns, group: str) -> GroupAccuracy | None:
    """The mean over writers with that kind of character (and over finished seeds) of their accuracy on it.

    None where the runs are missing or did not measure it (runs made before they were asked to).
    """
    if not runs.finished or any(f"initial_{group}_accuracy" not in r.evaluation for r in runs.finished):
        return None
    pairs = [smoothed(r, f"{group}_accuracy") for r in runs.finished]
    return GroupAccuracy(float(np.mean([_present_mean(i) for i, _ in pairs])),
                         float(np.mean([_present_mean(p) for _, p in pairs])))


def _present_mean(values: Sequence[float]) -> float:
    """The mean over the writers that have a value (NaN: none of that kind of character)."""
    present = np.asarray(values, dtype=np.float64)
    present = present[~np.isnan(present)]
    return float(present.mean()) if present.size else math.nan


def final_group_gains(runs: SeededRuns, group: str) -> tuple[float, float] | None:
    """The gain on one kind of character at the final checkpoint, with our fine-tuning and with the one chosen on
    training writers, over the seeds where it was chosen; None where it was not, or the kind was not measured."""
    key = f"initial_{group}_accuracy"
    records = [r for r in runs.finished if r.tuned is not None]
    if not records or any(key not in r.evaluation or key not in r.tuned for r in records):
        return None

    def gain(evaluation: dict) -> float:
        personalized = [a[-1] for a in evaluation[f"personalized_{group}_accuracy"]]
        return _present_mean(personalized) - _present_mean(evaluation[key])

    return (float(np.mean([gain(r.evaluation) for r in records])),
            float(np.mean([gain(r.tuned) for r in records])))


def mixed_gain(by_group: dict[str, GroupAccuracy], digit_share: float) -> float:
    """The gain of a test set with ``digit_share`` digits and letters for the rest."""
    return digit_share * by_group["digit"].gain + (1 - digit_share) * by_group["letter"].gain


class ClassMix(NamedTuple):
    """One Table 1 cell by kind of character: accuracies, the gain at our and at TFF's share of digits, how much of
    the gap to the paper's gain that reweighting closes (None without a gap), and the digits' and letters' gains at
    the final checkpoint with the default and the chosen fine-tuning (None where it was not chosen)."""

    by_group: dict[str, GroupAccuracy]
    ours: float
    theirs: float
    explained: float | None
    digits: tuple[float, float] | None
    letters: tuple[float, float] | None


def class_mix(cohort: int, epochs: int, cell: SeededRuns, digit_share: float) -> ClassMix | None:
    """None where the cell has no finished run that measured each kind, or no held-out writer has one kind."""
    by_group = {group: group_accuracy(cell, group) for group in plan.CLASS_GROUPS}
    if any(value is None or math.isnan(value.gain) for value in by_group.values()):
        return None
    ours, theirs = mixed_gain(by_group, digit_share), mixed_gain(by_group, TFF_DIGIT_SHARE)
    paper = paper_row(cohort, epochs)
    gap = None if paper is None else paper.gain - ours
    return ClassMix(by_group, ours, theirs, (theirs - ours) / gap if gap is not None and gap > 0 else None,
                    final_group_gains(cell, "digit"), final_group_gains(cell, "letter"))


def class_mixes(findings: Findings, digit_share: float) -> dict[tuple[int, int], ClassMix]:
    """``class_mix`` of every Table 1 cell that has one, by (clients per round, E)."""
    return {key: mix for key, cell in findings.table1.items() if (mix := class_mix(*key, cell, digit_share))}


def class_mix_rows(findings: Findings, digit_share: float) -> list[list[str]]:
    """Per finished Table 1 cell that measured them: each kind's accuracy, and the gain at our mix and at TFF's."""
    rows = []
    for (cohort, epochs), mix in class_mixes(findings, digit_share).items():
        paper = paper_row(cohort, epochs)
        tuned = ("—" if mix.digits is None or mix.letters is None else
                 f"{mix.digits[0]:+.3f} / {mix.letters[0]:+.3f} → {mix.digits[1]:+.3f} / {mix.letters[1]:+.3f}")
        rows.append([findings.table1[cohort, epochs].so_far,
                     *(f"{v.initial:.3f} → {v.personalized:.3f} ({v.gain:+.3f})" for v in mix.by_group.values()),
                     f"{mix.ours:+.4f}", f"{mix.theirs:+.4f}", "—" if paper is None else f"{paper.gain:+.4f}",
                     "—" if mix.explained is None else f"{mix.explained:.0%}", tuned])
    return rows


class FineTuning(NamedTuple):
    """One Table 1 cell's fine-tuning study: the choices, and the gains with our fine-tuning and with the chosen
    one at the final checkpoint; ``better`` is tuned − default personalized accuracy, paired by writer."""

    chosen: str
    default: Accuracies
    tuned: Accuracies
    better: verdicts.Interval


def fine_tunings(findings: Findings) -> dict[tuple[int, int], FineTuning]:
    """Each Table 1 cell whose fine-tuning was chosen, by (clients per round, E)."""
    studied = {}
    for (cohort, epochs), cell in findings.table1.items():
        if cell.tuned is None:
            continue
        default, tuned = cell.tuned
        chosen = "; ".join(f"{r.tuned['tuning']['optimizer']} lr {r.tuned['tuning']['lr']:g}, "
                           f"{r.tuned['tuning']['epochs']} epoch(s)" for r in cell.finished if r.tuned is not None)
        better = verdicts.paired_change(default, tuned, "personalized", f"c{cohort}/E{epochs} default against tuned")
        studied[cohort, epochs] = FineTuning(chosen, default, tuned, better)
    return studied


def fine_tuning_rows(findings: Findings) -> list[list[str]]:
    """Per Table 1 cell whose fine-tuning was chosen: the choice, and the gain with it beside the default's."""
    rows = []
    for (cohort, epochs), study in fine_tunings(findings).items():
        paper = paper_row(cohort, epochs)
        rows.append([findings.table1[cohort, epochs].so_far, study.chosen, accuracy_cell(study.tuned.personalized),
                     str(verdicts.paired_interval(study.default.gains)),
                     str(verdicts.paired_interval(study.tuned.gains)), str(study.better),
                     "—" if paper is None else f"{paper.gain:+.4f}"])
    return rows


class SizeQuarters(NamedTuple):
    """Writers in four groups by their train examples, smallest first: each group's sizes and mean gain."""

    sizes: tuple[tuple[int, int], ...]
    gains: tuple[float, ...]
    largest_less_smallest: verdicts.Interval


def gain_by_writer_size(cell: SeededRuns) -> SizeQuarters | None:
    """The per-writer gain (``accuracies``, first seed) by quarter of writer size, and the largest quarter's mean
    gain less the smallest's (an unpaired interval: different writers). None where sizes were not recorded."""
    if not cell.finished or "client_num_train" not in cell.finished[0].evaluation:
        return None
    sizes = np.asarray(cell.finished[0].evaluation["client_num_train"])
    gains = cell.accuracies.gains[0]
    quarters = np.array_split(np.argsort(sizes, kind="stable"), 4)
    return SizeQuarters(tuple((int(sizes[q].min()), int(sizes[q].max())) for q in quarters),
                        tuple(float(gains[q].mean()) for q in quarters),
                        verdicts.unpaired_interval([gains[quarters[0]]], [gains[quarters[-1]]]))


def writer_size_rows(findings: Findings) -> list[list[str]]:
    """Per finished Table 1 cell that recorded writer sizes: the mean gain of each size quarter, and their gap."""
    rows = []
    for cell in findings.table1.values():
        quarters = gain_by_writer_size(cell)
        if quarters is not None:
            rows.append([cell.so_far, *(f"{gain:+.4f} ({low}–{high})" for gain, (low, high)
                                       in zip(quarters.gains, quarters.sizes)), str(quarters.largest_less_smallest)])
    return rows


def _cited(runs: Sequence[RunRecord]) -> str:
    return ", ".join(f"`{record.spec.name}`" for record in runs)


def _span(values: Sequence[float], form: str) -> str:
    """The smallest to the largest of ``values`` (one value alone) in ``form``."""
    low, high = format(min(values), form), format(max(values), form)
    return low if low == high else f"{low} to {high}"


def _widens(shares: Sequence[float]) -> str:
    return ", a negative share widening it" if min(shares) < 0 else ""


def _among(labels: Sequence[str], count: int) -> str:
    return f"{len(labels)} of {count} cells" + (f" ({', '.join(labels)})" if labels and len(labels) < count else "")


def gap_evidence(findings: Findings, digit_share: float | None) -> list[str]:
    """What each explanation of the gap between our gains and the paper's says so far: one sentence each, from the
    tables of the report's *Why the gap* section, naming the runs it rests on. Empty until one was tested."""
    sentences = (_writers_sentence(findings), _fine_tuning_sentence(findings),
                 None if digit_share is None else _class_mix_sentence(findings, digit_share),
                 _writer_size_sentence(findings))
    return [sentence for sentence in sentences if sentence is not None]


def _label(key: tuple[int, int]) -> str:
    return f"c{key[0]}/E{key[1]}"


def _writers_sentence(findings: Findings) -> str | None:
    writers = findings.verdicts["gain_grows_with_writers"]
    if writers.outcome == "not run":
        return None
    runs = [r for by_count in findings.writers.values() for cell in by_count.values() for r in cell.finished]
    return f"**The number of training writers**: {writers.shown_outcome}. {writers.evidence} (runs {_cited(runs)})."


def _fine_tuning_sentence(findings: Findings) -> str | None:
    studies = fine_tunings(findings)
    if not studies:
        return None
    up = [_label(k) for k, study in studies.items() if study.better.above_zero]
    down = [_label(k) for k, study in studies.items() if study.better.below_zero]
    closed = []
    for key, study in studies.items():
        paper = paper_row(*key)
        default, tuned = (verdicts.paired_interval(a.gains).mean for a in (study.default, study.tuned))
        if paper is not None and paper.gain > default:
            closed.append((tuned - default) / (paper.gain - default))
    text = (f"**Careful fine-tuning**: chosen on training writers, it raised the held-out writers' personalized "
            f"accuracy significantly in {_among(up, len(studies))}")
    text += f" and lowered it significantly in {_among(down, len(studies))}" if down else ""
    text += f"; it closes {_span(closed, '.0%')} of the gap to the paper's gain{_widens(closed)}" if closed else ""
    runs = [r for key in studies for r in findings.table1[key].finished if r.tuned is not None]
    return f"{text} (runs {_cited(runs)}, each with its `tuned_evaluation.json`)."


def _class_mix_sentence(findings: Findings, digit_share: float) -> str | None:
    mixes = class_mixes(findings, digit_share)
    if not mixes:
        return None
    letters = [m.by_group["letter"].gain for m in mixes.values()]
    lose = [_label(k) for k, m in mixes.items() if m.by_group["letter"].gain < 0]
    tuned = [m.letters[1] for m in mixes.values() if m.letters is not None]
    lower = [_label(k) for k, m in mixes.items() if m.theirs < m.ours]
    explained = [m.explained for m in mixes.values() if m.explained is not None]
    text = (f"**The class mix**: on average over the held-out writers, personalizing lowers the accuracy on "
            f"letters in {_among(lose, len(mixes))} (letters' gain {_span(letters, '+.3f')}; digits' "
            f"{_span([m.by_group['digit'].gain for m in mixes.values()], '+.3f')})")
    if tuned:
        text += (f", and with the chosen fine-tuning in {len([g for g in tuned if g < 0])} of {len(tuned)} "
                 f"({_span(tuned, '+.3f')})")
    text += f". At TFF's share of digits the gain would be lower than at ours in {_among(lower, len(mixes))}"
    text += f": reweighting explains {_span(explained, '.0%')} of the gap{_widens(explained)}" if explained else ""
    runs = [r for key in mixes for r in findings.table1[key].finished]
    return f"{text} (runs {_cited(runs)})."


def _writer_size_sentence(findings: Findings) -> str | None:
    sizes = {_label(k): (q, cell.finished[0]) for k, cell in findings.table1.items()
             if (q := gain_by_writer_size(cell)) is not None}
    if not sizes:
        return None
    more = [label for label, (q, _) in sizes.items() if q.largest_less_smallest.above_zero]
    less = [label for label, (q, _) in sizes.items() if q.largest_less_smallest.below_zero]
    text = (f"**Writer size**: the quarter of held-out writers with the most train examples gains significantly "
            f"more than the quarter with the fewest in {_among(more, len(sizes))}")
    text += f", significantly less in {_among(less, len(sizes))}" if less else ""
    spread = _span([q.largest_less_smallest.mean for q, _ in sizes.values()], "+.4f")
    return f"{text}; largest − smallest {spread} (runs {_cited([r for _, r in sizes.values()])})."
