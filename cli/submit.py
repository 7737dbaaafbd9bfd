"""``camres submit``: send a job to a running camres service, follow it, fetch its artifacts.

The common case — CAM of a few images, optionally under damage and after masked retraining —
has flags; any other job (train, damage, retrain, evaluate, transfer, sweep) is sent from a
JSON spec with ``--spec``. Torch-free: it only needs :mod:`service.client`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from service.client import (
    ApiError,
    CamresClient,
    ClientError,
    Job,
    JobError,
    JobTimeoutError,
)

DEFAULT_URL = "http://127.0.0.1:8000"


class SubmitError(click.ClickException):
    """A failure reported as one line (or a few, for field errors) and exit code 1."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--url",
    envvar="CAMRES_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Base URL of the service (env CAMRES_URL).",
)
@click.option(
    "--api-key",
    envvar="CAMRES_API_KEY",
    default=None,
    help="API key, when the service requires one (sent as X-API-Key; env CAMRES_API_KEY).",
)
@click.option(
    "--model",
    "model",
    metavar="CKPT_OR_ID",
    help="A .safetensors checkpoint (uploaded first) or a model id on the service.",
)
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Send this JSON job spec (any kind) instead of building a cam job.",
)
@click.option("--method", type=click.Choice(["cam", "gradcam"]), help="CAM method.")
@click.option(
    "--class",
    "classes",
    multiple=True,
    metavar="NAME",
    help="Explain this class (repeatable); default: the top-k predictions.",
)
@click.option("--top-k", type=click.IntRange(min=1), help="Explain the k best classes.")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="HAR threshold, a fraction of the map's maximum.",
)
@click.option(
    "--damage-target",
    "damage_targets",
    multiple=True,
    metavar="TARGET",
    help="D1–D4, a module name or a glob (repeatable); default: D1–D4.",
)
@click.option(
    "--damage-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    help="Fraction of each target's weights stuck at zero; enables damage.",
)
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the damage draw.")
@click.option(
    "--retrain-dataset",
    metavar="ID_OR_PATH",
    help="Masked retraining on this dataset (id, or a folder/zip uploaded first).",
)
@click.option("--epochs", type=click.IntRange(min=1), help="Retraining epochs.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the artifacts  [default: camres-out/<job id>].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds to wait for the job.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Seconds between status polls.",
)
@click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def submit(
    images: tuple[Path, ...],
    url: str,
    api_key: str | None,
    model: str | None,
    spec_file: Path | None,
    out_dir: Path | None,
    timeout: float,
    poll_interval: float,
    no_wait: bool,
    quiet: bool,
    **cam_flags: Any,
) -> None:
    """Submit a job to a camres service and download its artifacts.

    \b
    A CAM job of IMAGES, intact, damaged and retrained:
      camres submit --model ucm.safetensors --damage-target D4 --damage-fraction 0.5 \\
          --retrain-dataset ucm/ --epochs 3 --out out/ tile1.jpg tile2.jpg
    Any other job kind, from a JSON spec:
      camres submit --spec train.json

    Ctrl-C while waiting cancels the job on the service.
    """
    flags = CamFlags(**cam_flags)
    with _reported_errors(), CamresClient(url, api_key=api_key) as client:
        spec = _job_spec(client, model, spec_file, flags, quiet)
        job = client.submit_job(spec, images)
        if no_wait:
            click.echo(job["id"])
            return
        _status(quiet, f"submitted {job.get('kind', 'job')} job {job['id']}")
        started = time.monotonic()
        job = _follow(client, job["id"], timeout, poll_interval, quiet)
        target = out_dir or Path("camres-out") / _dirname(job["id"])
        files = client.download_artifacts(job["id"], target)
        (target / "job.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
        _summarize(job, target, len(files), time.monotonic() - started)


# -- building the spec ------------------------------------------------------------------


@dataclass(frozen=True)
class CamFlags:
    """The cam-job flags, by their parameter names."""

    method: str | None
    classes: tuple[str, ...]
    top_k: int | None
    threshold: float | None
    damage_targets: tuple[str, ...]
    damage_fraction: float | None
    seed: int | None
    retrain_dataset: str | None
    epochs: int | None

    def given(self) -> list[str]:
        """The command-line names of the flags that were set."""
        renamed = {"classes": "--class", "damage_targets": "--damage-target"}
        return [
            renamed.get(name, "--" + name.replace("_", "-"))
            for name, value in vars(self).items()
            if value is not None and value != ()
        ]

    def check(self) -> None:
        if self.damage_fraction is None and (self.damage_targets or self.seed is not None):
            raise click.UsageError("--damage-target and --seed need --damage-fraction")
        if self.epochs is not None and self.retrain_dataset is None:
            raise click.UsageError("--epochs needs --retrain-dataset")

    def spec(self, model: str, retrain_dataset: str | None) -> dict[str, Any]:
        """A cam JobSpec holding only what was asked: the service owns every default."""
        cam = _present(
            method=self.method,
            classes=list(self.classes) or None,
            top_k=self.top_k,
            har_threshold=self.threshold,
        )
        spec: dict[str, Any] = {"kind": "cam", "model": model, "cam": cam}
        if self.damage_fraction is not None:
            spec["damage"] = _present(
                targets=list(self.damage_targets) or None,
                fraction=self.damage_fraction,
                seed=self.seed,
            )
        if retrain_dataset is not None:
            spec["retrain"] = {"dataset": retrain_dataset, "config": _present(epochs=self.epochs)}
        return spec


def _job_spec(
    client: CamresClient,
    model: str | None,
    spec_file: Path | None,
    flags: CamFlags,
    quiet: bool,
) -> dict[str, Any]:
    """The spec to send: ``--spec``'s file (its model replaced by ``--model``), or a cam job
    built from the flags. Local model and dataset files are uploaded first."""
    if spec_file is not None:
        if given := flags.given():
            raise click.UsageError(f"{', '.join(given)} cannot be combined with --spec")
        spec = _read_spec(spec_file)
        if model is not None:
            spec["model"] = _model_id(client, model, quiet)
        return spec
    if model is None:
        raise click.UsageError("give --model (or a whole job with --spec)")
    flags.check()
    model_id = _model_id(client, model, quiet)
    return flags.spec(model_id, _dataset_id(client, flags.retrain_dataset, quiet))


def _present(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--spec") from exc
    if not isinstance(spec, dict) or "kind" not in spec:
        raise click.BadParameter(
            f"{path} is not a job spec object with a 'kind'", param_hint="--spec"
        )
    return spec


def _model_id(client: CamresClient, model: str, quiet: bool) -> str:
    """The model's id on the service, uploading ``model`` first when it is a local file."""
    path = Path(model)
    if not path.is_file():
        return model
    info = client.upload_model(path)
    _status(quiet, f"uploaded model {path.name} as {info['id']} ({info.get('arch', '?')})")
    return str(info["id"])


def _dataset_id(client: CamresClient, dataset: str | None, quiet: bool) -> str | None:
    """The dataset's id on the service, uploading a local folder or zip first."""
    if dataset is None or not Path(dataset).exists():
        return dataset
    info = client.upload_dataset(dataset)
    _status(quiet, f"uploaded dataset {dataset} as {info['id']} ({info.get('num_images')} images)")
    return str(info["id"])


# -- following the job ------------------------------------------------------------------


def _follow(client: CamresClient, job_id: str, timeout: float, interval: float, quiet: bool) -> Job:
    """Wait for the job with a progress bar; Ctrl-C cancels it on the service."""
    with tqdm(
        total=100,
        unit="%",
        disable=True if quiet else None,  # None: no bar when stderr is not a terminal
        leave=False,
        dynamic_ncols=True,
        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}",
    ) as bar:

        def show(job: Job) -> None:
            progress = job.get("progress") or {}
            bar.n = round(100 * float(progress.get("fraction") or 0.0), 1)
            bar.set_description_str(str(progress.get("stage") or job.get("status", "")))
            # A second attempt means a worker died under the job: worth seeing while it runs.
            retried = f"attempt {_attempts(job)} " if _attempts(job) > 1 else ""
            bar.set_postfix_str(retried + str(progress.get("message") or ""), refresh=False)
            bar.refresh()

        try:
            return client.wait(job_id, poll_interval=interval, timeout=timeout, on_progress=show)
        except KeyboardInterrupt:
            bar.close()
            _cancel_quietly(client, job_id)
            raise click.Abort() from None


def _cancel_quietly(client: CamresClient, job_id: str) -> None:
    try:
        client.cancel(job_id)
        click.echo(f"cancelled job {job_id}", err=True)
    except ClientError as exc:
        click.echo(f"could not cancel job {job_id}: {exc}", err=True)


def _attempts(job: Job) -> int:
    """Runs a worker started for ``job`` (more than 1: a worker died under it)."""
    return int(job.get("attempts") or 0)


def _attempts_note(job: Job) -> str:
    count = _attempts(job)
    return f"{count} attempt{'' if count == 1 else 's'}"


def _summarize(job: Job, target: Path, count: int, seconds: float) -> None:
    click.echo(f"job {job['id']} succeeded in {seconds:.1f} s ({_attempts_note(job)})")
    result = job.get("result") or {}
    if job.get("kind") == "cam":
        for image in result.get("images", []):
            for condition, cam in (image.get("conditions") or {}).items():
                if cam:
                    top = cam["prediction"]
                    click.echo(
                        f"  {image.get('image')} [{condition}]: {top['label']} "
                        f"({top['probability']:.3f})"
                    )
    elif job.get("kind") == "sweep":
        click.echo(
            f"  {result.get('cells')} damaged networks on {result.get('images')} images; intact "
            f"accuracy {_percent(result.get('intact_accuracy'))}"
        )
    elif job.get("kind") == "transfer":
        before = (result.get("report") or {}).get("before") or {}
        click.echo(
            f"  shared-class accuracy {_percent(before.get('accuracy'))} "
            f"({before.get('correct')}/{before.get('images')} images)"
        )
        if result.get("model"):
            click.echo(f"  fine-tuned model {result['model']}")
    elif result:
        click.echo(json.dumps(result, indent=2))
    click.echo(f"{count} artifact(s) and job.json in {target}")


def _percent(value: object) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "n/a"


# -- errors -----------------------------------------------------------------------------


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Client errors become a short message and exit code 1, never a traceback."""
    try:
        yield
    except ApiError as exc:
        raise SubmitError(f"the service answered {exc}") from exc
    except JobTimeoutError as exc:
        note = _attempts_note(exc.job)
        raise SubmitError(f"{exc}; it keeps running on the service ({note})") from exc
    except JobError as exc:
        raise SubmitError(f"{exc} ({_attempts_note(exc.job)})") from exc
    except ClientError as exc:
        raise SubmitError(str(exc)) from exc
    except OSError as exc:
        raise SubmitError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc


def _status(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _dirname(job_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
