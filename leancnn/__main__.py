"""`python -m leancnn ...` (what torchrun starts: `torchrun --nproc-per-node 2 -m leancnn train ...`)."""
import sys

from .cli import main

sys.exit(main())
