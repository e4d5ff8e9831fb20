"""``python -m sparsefx ...`` (what ``torchrun --nproc-per-node N -m sparsefx compress ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
