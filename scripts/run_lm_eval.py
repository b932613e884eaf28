"""lm-evaluation-harness's command line with this project's model class `sophia-gpt`. The code is
gpt/cli/run_lm_eval.py; installed, the same command is `sophia-lm-eval`, which runs from any folder."""

from gpt.cli.run_lm_eval import cli

if __name__ == "__main__":
    cli()
