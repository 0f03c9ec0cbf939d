"""`python -m fwllm ...`: the `fwllm` command."""

from fwllm.cli import main

if __name__ == "__main__":
    main()
