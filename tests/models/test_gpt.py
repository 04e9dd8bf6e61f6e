import pytest
import torch

from glmlab.config import resolve_config
from glmlab.errors import ConfigError
from glmlab.models import build_model
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.training.optim import parameter_groups

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def test_matches_hugging_face_gpt2_by_plain_copy():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT(CFG).eval()
    hf_state = hf.state_dict()
    own_state = ours.state_dict()
    for name, tensor in own_state.items():  # a plain copy: same names, same shapes
        assert hf_state[name].shape == tensor.shape, name
        tensor.copy_(hf_state[name])
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5


def test_kv_cache_gives_the_same_logits_as_a_full_pass():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, torch.device("cpu"))
        parts = [model(idx[:, :5], cache), model(idx[:, 5:9], cache)]
        parts += [model(idx[:, i:i + 1], cache) for i in range(9, 14)]
    assert cache.lengths == [14, 14]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_ragged_rows_keep_their_own_positions():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    a, b = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        cache = model.new_cache(2, torch.device("cpu"))
        padded = torch.zeros(2, 9, dtype=torch.long)
        padded[0], padded[1, :4] = a[0], b[0]
        last = model(padded, cache, valid=[9, 4], last_only=True)  # right-padded prefill
        assert cache.lengths == [9, 4]
        assert torch.allclose(last[0, 0], model(a)[0, -1], atol=1e-5)
        assert torch.allclose(last[1, 0], model(b)[0, -1], atol=1e-5)
        nxt = torch.tensor([[7], [11]])
        step = model(nxt, cache)  # one token per row, at positions 9 and 4
        assert torch.allclose(step[0, 0], model(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-5)
        assert torch.allclose(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5)
        cache.select([1])  # row 0 leaves
        step = model(torch.tensor([[3]]), cache)
        assert torch.allclose(step[0, 0], model(torch.cat([b, nxt[1:], torch.tensor([[3]])], 1))[0, -1], atol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 50
    with torch.no_grad():
        assert torch.allclose(model(a)[0, :8], model(b)[0, :8], atol=1e-6)
        assert not torch.allclose(model(a)[0, 8:], model(b)[0, 8:])


def test_weights_are_tied_and_groups_split_decay():
    model = GPT(CFG)
    assert model.lm_head.weight is model.transformer.wte.weight
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_loss_ignores_masked_targets_and_nll_sums():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    x = torch.randint(0, 50, (2, 8))
    y = torch.randint(0, 50, (2, 8))
    y_masked = y.clone()
    y_masked[:, :4] = -100
    with torch.no_grad():
        assert torch.isclose(model.nll(x, y), model.loss(x, y) * 16, rtol=1e-5)
        logp = model(x).log_softmax(-1)
        expected = -logp[:, 4:].gather(-1, y[:, 4:, None]).sum()
        assert torch.isclose(model.nll(x, y_masked), expected, rtol=1e-5)


def test_no_bias_variant_and_sequence_too_long():
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8, bias=False))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_config_validation_and_registry():
    with pytest.raises(ConfigError, match="divisible"):
        resolve_config({}, ["model.n_embd=30", "model.n_head=4"])
    with pytest.raises(ConfigError, match="unknown model family"):
        resolve_config({}, ["model.family=transformerxl"])
    cfg = resolve_config({}, ["model.vocab_size=30", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"])
    assert isinstance(build_model(cfg.model), GPT)
