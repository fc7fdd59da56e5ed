"""Hugging Face transformers backbones through the library API: tiny random-weight models built from configs.

A LLaMA-style causal LM (bias-free projections, C/D/E stay none, tied lm_head) and a BERT sequence classifier
(linear layers with bias, a fresh ``classifier`` head): supernet steps in a user loop, a search with a user
score (negative validation loss), the compact retrain, merge, and ``save_pretrained`` -> ``from_pretrained`` of
the plain merged model reproduces the adapted logits with the subnet's parameter count.
"""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from supernet import GloraSupernet, adapter_parameters, apply_subnet, merge_and_unload, search_subnet  # noqa: E402

V, L = 32, 12
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=L,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(num_labels=3):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=L, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def lm_data(n, g):
    """Sequences that count up modulo V from a random start: learnable next-token prediction."""
    start = torch.randint(0, V, (n, 1), generator=g)
    return (start + torch.arange(L)) % V


def cls_data(n, g):
    ids = torch.randint(1, V, (n, L), generator=g)
    return ids, (ids[:, 0] % 3)   # the class is a function of the first token


def run_pipeline(model, targets, loss_fn, logits_fn, train_head, steps=12):
    """Supernet -> search -> compact retrain -> merge, as a user with their own loop would write it."""
    base_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        base = logits_fn(model)
    sn = GloraSupernet(model, target_modules=targets, ranks=[2], train_head=train_head)
    opt = torch.optim.AdamW(sn.trainable_parameters(), lr=1e-2)
    sn.train()
    for step in range(steps):
        sn.sample_path(seed=0, step=step)
        loss = loss_fn(sn, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lo, hi = sn.space.param_range()
    result = search_subnet(sn, lambda m: -float(loss_fn(m, -1)), max_params=(lo + hi) // 2, generations=2,
                           population=6, seed=0)
    assert lo <= result.best_params <= (lo + hi) // 2
    compact = apply_subnet(sn.model, result.best)
    assert sum(p.numel() for p in adapter_parameters(compact)) == result.best_params
    opt = torch.optim.AdamW([p for p in compact.parameters() if p.requires_grad], lr=1e-2)
    compact.train()
    for step in range(steps // 2):
        loss = loss_fn(compact, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    compact.eval()
    with torch.no_grad():
        adapted = logits_fn(compact)
        merged = merge_and_unload(compact)
    assert not torch.allclose(adapted, base, atol=1e-3)     # the adapters changed the model
    assert sum(p.numel() for p in merged.parameters()) == base_params
    return result, adapted, merged


def test_llama_causal_lm(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, val = lm_data(32, g), lm_data(16, g)
    model = tiny_llama()
    embed_before = model.model.embed_tokens.weight.detach().clone()

    def loss_fn(m, step):
        ids = val if step < 0 else train[(step * 8) % 32:(step * 8) % 32 + 8]
        return m(input_ids=ids, labels=ids).loss

    result, adapted, merged = run_pipeline(model, LLAMA_TARGETS, loss_fn, lambda m: m(input_ids=val).logits,
                                           train_head=True)
    names = result.best.names
    assert len(names) == 14 and all(n.rsplit(".", 1)[-1] in LLAMA_TARGETS for n in names)
    assert all(c.C == c.D == c.E == "none" for c in result.best.layers)   # bias-free layers
    # the lm_head is tied to the input embeddings: not adapted and not trained
    assert torch.equal(merged.model.embed_tokens.weight, embed_before)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    merged.save_pretrained(tmp_path / "merged")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=val).logits, adapted, atol=1e-4, rtol=1e-4)


def test_bert_sequence_classifier(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    (xt, yt), (xv, yv) = cls_data(48, g), cls_data(16, g)
    model = tiny_bert()
    head_before = model.classifier.weight.detach().clone()

    def loss_fn(m, step):
        i = (step * 8) % 48
        x, y = (xv, yv) if step < 0 else (xt[i:i + 8], yt[i:i + 8])
        return F.cross_entropy(m(input_ids=x).logits, y)

    result, adapted, merged = run_pipeline(model, ["query", "key", "value", "dense"], loss_fn,
                                           lambda m: m(input_ids=xv).logits, train_head=True)
    assert "classifier" not in result.best.names and "bert.pooler.dense" in result.best.names
    assert not torch.equal(merged.classifier.weight, head_before)       # the fresh head trained
    merged.save_pretrained(tmp_path / "merged")
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=xv).logits, adapted, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_is_named():
    from glora.core.errors import UserError
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=L)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(UserError, match=r"transformer\.h\.0\.attn\.c_attn .*Conv1D"):
        GloraSupernet(model, target_modules=["c_attn"])
