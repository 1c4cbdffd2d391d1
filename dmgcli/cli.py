"""The `dmg` command line: one command per pipeline stage.

Each command reads params.yaml (--params), applies its flags on top, and calls the stage's
plain function in stages/. Errors a user can fix print one line on stderr and exit 1.
Arguments are checked before a stage module (and with it torch) is imported, so a bad flag
fails at once; the cli modules and dmgcli/params.py import no torch.

The app and what the commands share: dmgcli/cli_base.py. The commands, by what they do:
cli_data.py (check, download, preprocess, features, info), cli_runs.py (train, evaluate,
sweep, study), cli_reports.py (report, bench).
"""
from __future__ import annotations

import sys

from . import cli_data, cli_reports, cli_runs
from .cli_base import app

COMMAND_MODULES = (cli_data, cli_runs, cli_reports)  # importing them registers their commands on `app`


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
