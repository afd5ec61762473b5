"""``python -m phi3v`` (also what ``torchrun -m phi3v`` runs)."""

import sys

from phi3v.cli import main

sys.exit(main())
