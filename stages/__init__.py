"""One module per pipeline stage. Each exposes a plain function that does the work; the
Typer commands in dmgcli.cli only parse flags and call it."""
