"""Validation loss and perplexity of a run, a checkpoint or Hugging Face weights. The code is
gpt/cli/eval_loss.py; installed, the same command is `sophia-eval-loss`, which runs from any folder."""

from gpt.cli.eval_loss import cli

if __name__ == "__main__":
    cli()
