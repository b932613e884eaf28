"""Steps, FLOPs and time each run needs to reach a baseline's final validation loss. The code is
gpt/cli/speedup.py; installed, the same command is `sophia-speedup`, which runs from any folder."""

from gpt.cli.speedup import cli

if __name__ == "__main__":
    cli()
