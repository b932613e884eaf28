"""Sample text from a run, a checkpoint or Hugging Face weights. The code is gpt/cli/sample.py; installed, the
same command is `sophia-sample`, which runs from any folder."""

from gpt.cli.sample import cli

if __name__ == "__main__":
    cli()
