"""``python -m icl ...`` runs the command line (also under torchrun: ``torchrun ... -m icl train ...``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
