"""Steps, FLOPs and time each run needs to reach a baseline's final validation loss. The code is
gpt/cli/speedup.py; installed, the same command is `sophia-speedup`, which runs from any folder."""

from gpt.cli import speedup

if __name__ == "__main__":
    speedup()
