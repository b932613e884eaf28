"""Plot validation and training curves of runs. The code is gpt/cli/plot_curves.py; installed, the same
command is `sophia-plot-curves`, which runs from any folder."""

from gpt.cli.plot_curves import cli

if __name__ == "__main__":
    cli()
