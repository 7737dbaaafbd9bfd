"""Parameter types and helpers shared by the ``camres`` subcommands (torch-free)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from core.progress import Progress, ProgressCallback

M = TypeVar("M", bound=BaseModel)

CHECKPOINT = click.Path(exists=True, dir_okay=False, path_type=Path)
FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
OUTPUT = click.Path(dir_okay=False, writable=True, path_type=Path)
OUT_DIR = click.Path(file_okay=False, path_type=Path)


def validated(model: type[M], options: dict[str, str] | None = None, **values: Any) -> M:
    """``model(**values)`` without the options left unset (None), so the model's defaults apply;
    validation errors become one usage error naming the command-line options (``options`` maps
    field names to option names where they differ from ``--field-name``)."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across fields: the message names them
                problems.append(error["msg"])
                continue
            field = str(error["loc"][0])
            option = (options or {}).get(field, "--" + field.replace("_", "-"))
            problems.append(f"{option}: {error['msg']}")
        raise click.UsageError("; ".join(problems)) from None


@contextmanager
def progress_bar(
    description: str, postfix: Callable[[Progress], str] | None = None
) -> Iterator[ProgressCallback]:
    """A tqdm bar over a job's overall fraction, named after the running stage, with
    ``postfix(progress)`` after it; hidden when stderr is not a terminal."""
    with tqdm(total=1.0, desc=description, unit="", disable=None, leave=False) as bar:
        bar.bar_format = "{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"

        def update(progress: Progress) -> None:
            bar.n = progress.fraction
            bar.set_description(progress.stage, refresh=False)
            if postfix is not None:
                bar.set_postfix_str(postfix(progress), refresh=False)
            bar.refresh()

        yield update


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    click.echo(json.dumps(data, indent=2))


def percent(value: float | None) -> str:
    """A fraction as a fixed-width percentage, ``n/a`` for None."""
    return "   n/a" if value is None else f"{100 * value:5.1f}%"
