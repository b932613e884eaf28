"""HellaSwag accuracy of a run, a checkpoint or Hugging Face weights. The code is gpt/cli/eval_hellaswag.py;
installed, the same command is `sophia-eval-hellaswag`, which runs from any folder."""

from gpt.cli.eval_hellaswag import cli

if __name__ == "__main__":
    cli()
