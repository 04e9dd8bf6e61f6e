"""`python -m glmlab` runs the command-line interface."""

from glmlab.cli import main

raise SystemExit(main())
