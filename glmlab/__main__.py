"""`python -m glmlab` runs the command-line interface."""

from glmlab.cli import main

if __name__ == "__main__":  # not when a spawned process (glmlab serve's engine) re-imports the main module
    raise SystemExit(main())
