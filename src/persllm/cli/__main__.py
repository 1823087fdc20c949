"""``python -m persllm.cli``: the ``persllm`` command, run by the interpreter you name."""

from persllm.cli import main

if __name__ == "__main__":
    main()
