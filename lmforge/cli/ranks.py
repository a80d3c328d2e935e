"""Handing a command that runs an artifact (`run`, `bench`, `eval`) over to the ranks of a tensor-parallel
job: `runtime/launch.py` decides and starts them; this prints what the job left to say and exits with its
status."""

from __future__ import annotations

from pathlib import Path

import click

from lmforge.runtime.launch import start_ranks


def hand_over_to_ranks(argv: list[str], artifact: Path, tp: int | None, device: str) -> None:
    """Return when this process should run ARTIFACT itself; otherwise run `lmforge *argv` as the job's ranks
    and exit with their status, printing a rank's error line when rank 0 left none."""
    job = start_ranks(argv, artifact, tp, device)
    if job is None:
        return
    if job.error is not None:
        click.echo(job.error, err=True)
    raise SystemExit(job.code)
