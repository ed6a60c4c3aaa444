"""``python -m lblctl`` (and ``torchrun -m lblctl``): the same as the ``lblctl`` command."""

from lblctl.cli import main

if __name__ == "__main__":
    main()
