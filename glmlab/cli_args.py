"""Arguments several commands declare alike, kept free of heavy imports: building the command line (``glmlab
--help``, a mistyped flag, ``glmlab prepare``) then never waits for PyTorch to load."""

from __future__ import annotations

import argparse

CHECKPOINT_HELP = ("which weights: best (lowest validation loss), last (newest checkpoint) or a checkpoint's name "
                   "(step-N, in RUN_DIR/checkpoints); each is checked against its checksum before it is loaded")


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint best|last|step-N``: which of a run's weights a command loads."""
    parser.add_argument("--checkpoint", default="best", metavar="best|last|step-N", help=CHECKPOINT_HELP)
