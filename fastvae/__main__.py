"""`python -m fastvae` works like the `fastvae` command."""
import sys

from fastvae.cli import main

sys.exit(main())
