"""Export a run or checkpoint to a Hugging Face GPT-2 folder. The code is gpt/cli/export_hf.py; installed, the
same command is `sophia-export-hf`, which runs from any folder."""

from gpt.cli.export_hf import cli

if __name__ == "__main__":
    cli()
