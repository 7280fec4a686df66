"""The reproduction report: our numbers beside the paper's, plots and a verdict per claim.

Written from whatever runs exist, in four steps: ``collect`` reads the run directories and
the data's size, ``findings.find`` computes the numbers and verdicts, ``markdown.render``
lays them out, ``figures.write_figures`` plots them.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedmeta.experiment.reproduce.collect import collect
from fedmeta.experiment.reproduce.figures import PLOTS, write_figures
from fedmeta.experiment.reproduce.findings import find
from fedmeta.experiment.reproduce.markdown import render
from fedmeta.experiment.reproduce.plan import Scale


def write_report(scale: Scale, output: Path, data_dir: Path, report_dir: Path | None = None, *,
                 command: str = "fedmeta reproduce report", source: str | None = None) -> Path:
    """Writes ``report.md`` and ``plots/`` for the runs present; returns the report's path.

    ``report_dir`` defaults to ``output/<scale>``; ``source`` names where ``data_dir``
    came from in errors (default ``--data-dir DIR``).
    """
    collected = collect(scale, output, data_dir, source)
    findings = find(collected)
    report_dir = report_dir or output / scale.name
    (report_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    write_figures(findings, report_dir / PLOTS)
    path = report_dir / "report.md"
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.write_text(render(collected, findings, command=command, generated=generated))
    return path
