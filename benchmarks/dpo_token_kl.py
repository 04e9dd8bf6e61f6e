"""DPO with a token-level KL term, measured without making it a glmlab option (benchmarks/README.md, DPO's eighth run).

Runs ``dpo_sentiment.py`` (same arguments) with ``PreferenceObjective``'s training loss patched to add ``--token-kl``
λ times the mean, over the pair texts' scored positions, of KL(π_ref(·|context) ‖ π(·|context)) between the
reference's and the policy's full next-token distributions (after TDPO, Zeng et al., 2024): DPO constrains each
answer's total log-ratio only, this term every change of the policy at every position. ``--dpo-dropout`` sets the
policies' ``model.dropout`` (``finetune dpo`` defaults to 0 since the eighth run; earlier runs kept the init's 0.1).

    python benchmarks/dpo_token_kl.py --token-kl 2 --dpo-dropout 0.1 -- --base RUN --reward CLASSIFIER --work W \\
        --pair-rule label --pair-samples 4 --pairs 30000 --dpo-lr 5e-5 --dpo-steps 3000 --rpo-alpha 1 --betas 0.1
"""

from __future__ import annotations

import argparse
import sys

import dpo_sentiment
import torch
import torch.nn.functional as F

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.finetune import preferences


def with_token_kl(weight: float):
    """``PreferenceObjective.forward`` plus ``weight`` x the token-level KL to the reference while training: the
    plain forward runs as it is (losses, stats), and the policy's logits are caught on their way through it."""
    plain = preferences.PreferenceObjective.forward

    def forward(self: preferences.PreferenceObjective, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not (self.model.training and weight):
            return plain(self, x, y)
        caught: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            loss = plain(self, x, y)
        finally:
            hook.remove()
        log_probs = F.log_softmax(caught[0].float(), -1)  # the policy's one pass over the pairs
        with torch.no_grad():
            ref_log_probs = F.log_softmax(self.reference(x).float(), -1)
        scored = y != IGNORE_INDEX
        kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
        token_kl = (kl * scored).sum() / scored.sum().clamp(min=1)
        self.model.stats["token_kl"] = token_kl.detach()
        return loss + weight * token_kl

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token-kl", type=float, required=True, help="λ, the token-level KL term's weight")
    parser.add_argument("--dpo-dropout", type=float, default=None, help="the DPO policies' model.dropout")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then dpo_sentiment.py's arguments")
    args = parser.parse_args()
    preferences.PreferenceObjective.forward = with_token_kl(args.token_kl)
    if args.dpo_dropout is not None:
        plain = dpo_sentiment.finetune

        def finetune(options, out, overrides=None, **kwargs):
            if options.task == "dpo":
                overrides = [*(overrides or []), f"model.dropout={args.dpo_dropout}"]
            return plain(options, out, overrides=overrides, **kwargs)

        dpo_sentiment.finetune = finetune
    sys.argv = [sys.argv[0], *(a for a in args.rest if a != "--")]
    dpo_sentiment.main()


if __name__ == "__main__":
    main()
