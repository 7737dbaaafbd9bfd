"""The ``camres`` command. Subcommands are imported only when invoked, so ``camres submit`` or
``camres --help`` never pay for importing torch."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from core.exceptions import CamresError

#: command name → "module:attribute" of its click command.
COMMANDS: dict[str, str] = {
    "cam": "cli.cam:cam",
    "train": "cli.training:train",
    "damage": "cli.training:damage",
    "retrain": "cli.training:retrain",
    "evaluate": "cli.training:evaluate",
    "serve": "cli.serve:serve",
    "worker": "cli.serve:worker",
    "submit": "cli.submit:submit",
    "export-openapi": "cli.serve:export_openapi",
    "sweep": "cli.sweep:sweep",
    "transfer": "cli.transfer:transfer",
}

SHORT_HELP: dict[str, str] = {
    "cam": "Write CAM overlays and HAR boxes for images, without a server.",
    "train": "Train or fine-tune a classifier on an image-folder dataset.",
    "damage": "Inject weight damage into a checkpoint.",
    "retrain": "Masked retraining of a damaged checkpoint.",
    "evaluate": "Accuracy, per-class accuracy and confusion matrix of a checkpoint.",
    "serve": "Run the gateway and a worker on this machine.",
    "worker": "Run a Celery worker.",
    "submit": "Submit a job to a running service and download its artifacts.",
    "export-openapi": "Write the gateway's OpenAPI document.",
    "sweep": "Sweep damage over locations and fractions: accuracy and CAM drift.",
    "transfer": "Evaluate a model on another dataset through a class mapping, with CAMs.",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import every subcommand (and torch with them).
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="camres")
def cli() -> None:
    """camres: how a CNN's Class Activation Maps hold up under weight damage."""


def main(argv: list[str] | None = None) -> Any:
    """Entry point: known errors become one line on stderr and exit code 2, never a traceback."""
    try:
        return cli.main(args=argv, prog_name="camres", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CamresError as exc:
        where = f" ({exc.field})" if exc.field else ""
        click.echo(f"error{where}: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
