"""Under torch.compile (the trainer's default on CUDA) the masked families' corruption runs eagerly (their
``host_work``): the draws come from the same generator as without compile, and only the forward pass becomes a
graph. Traced instead, glm's
per-row Python corruption recompiled on every batch (an H100 run never finished its pre-training) and bert's
masks would come from inductor's own random numbers."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from glmlab.data.tokenizer import FIRST_TEXT_ID
from glmlab.models.bert import BERT, BertConfig
from glmlab.models.glm import GLM, GLMConfig

pytestmark = pytest.mark.usefixtures("one_thread")
RANDOM_OPS = ("rand", "multinomial", "randperm", "poisson", "bernoulli")


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls, config = (GLM, GLMConfig) if family == "glm" else (BERT, BertConfig)
    config = config(vocab_size=60, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    config.validate()
    return cls(config).train()


@pytest.mark.parametrize("family", ["glm", "bert"])
def test_compiled_loss_draws_eagerly_and_does_not_recompile_per_batch(family):
    model = tiny(family)
    graphs: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):  # what dynamo would hand to inductor
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    model.keep_host_work_eager()  # what the trainer does before it compiles the step
    compiled = torch.compile(model.loss, backend=recording_backend)
    first_batch = 0
    for step in range(6):
        x = torch.randint(FIRST_TEXT_ID, 60, (4, 32), generator=torch.Generator().manual_seed(step))
        y = torch.roll(x, -1, dims=1)
        torch.manual_seed(100 + step)
        got = compiled(x, y)
        torch.manual_seed(100 + step)
        assert torch.equal(got, model.loss(x, y))  # the same masks and blanks as the eager step
        first_batch = first_batch or len(graphs)
    torch._dynamo.reset()
    assert graphs, "nothing was compiled"
    assert not [g for g in graphs if any(f"{op}" in g for op in RANDOM_OPS)], "a random draw was traced"
    assert len(graphs) == first_batch, f"{len(graphs) - first_batch} graphs compiled again after the first batch"
