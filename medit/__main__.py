"""``python -m medit``: the command line (also what ``accelerate launch -m medit`` and
``torchrun -m medit`` start in each process)."""

from medit.cli import main

if __name__ == "__main__":
    main(prog_name="medit")
