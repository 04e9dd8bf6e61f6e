"""`glmlab bench oracle`'s preset as the command line shows it: its help names every variant, the default
variants and the preset's step counts, from the one place they are defined."""

from __future__ import annotations

import pytest

from glmlab.cli import main


def test_the_help_names_every_variant_and_the_default(capsys) -> None:
    from glmlab.bench.preset import CPU_MLE_STEPS, CPU_ROUNDS, DEFAULT_VARIANTS, VARIANTS

    with pytest.raises(SystemExit):
        main(["bench", "oracle", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert [name for name in VARIANTS if f"{name} (" not in text] == []
    assert f"default:{','.join(DEFAULT_VARIANTS)}" in text.replace(" ", "")  # argparse may wrap at a hyphen
    assert f"the CPU preset, {CPU_MLE_STEPS:,})" in text and f"the CPU preset, {CPU_ROUNDS})" in text
