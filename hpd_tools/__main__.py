"""``python -m hpd_tools`` (and ``torchrun ... -m hpd_tools distill ...``): the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
