"""The app of a generated program, served by a process of its own (``tests.worker_process --app
tests.conformance.azure_app:app``, or ``durable start`` over a folder whose ``function_app.py``
imports it).

The program is the file named by ``CONFORMANCE_PROGRAM`` (its ``repr``); every run of its ``work``
activity is appended, as a JSON line, to a file of this process in the folder ``CONFORMANCE_RUNS``,
so that the runner can count runs across processes that get killed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import durable as df

from . import model, programs


def program_from_repr(text: str) -> programs.Program:
    """A program from its ``repr`` (which is Python that rebuilds it)."""
    namespace = {**vars(model), **vars(programs)}
    program = eval(text, namespace)  # our own file, written by the runner
    assert isinstance(program, programs.Program)
    return program


def _record_run(folder: Path) -> Callable[[tuple[str, str]], None]:
    path = folder / f"runs-{os.getpid()}.jsonl"

    def record(key: tuple[str, str]) -> None:
        # One write(2) of one line on an O_APPEND file: in the file once it returns, even if the
        # process is SIGKILLed right after.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, (json.dumps(list(key)) + "\n").encode())
        finally:
            os.close(descriptor)

    return record


def _load() -> df.DFApp:
    program = program_from_repr(Path(os.environ["CONFORMANCE_PROGRAM"]).read_text())
    return programs.build_app(program, on_work=_record_run(Path(os.environ["CONFORMANCE_RUNS"]))).app


app = _load()
