"""Sequence log-probs against a naive full-vocabulary log_softmax, values and gradients."""
import pytest
import torch
from torch import nn

from directpo.data import Example, collate_padded, make_collate, tokenize_example
from directpo.logprobs import dataset_logps, example_logps, label_logprobs, sequence_logps
from directpo.losses import dpo_loss
from directpo.models import load_model


def naive_sequence_logps(model, batch):
    """The textbook computation: full logits, full log_softmax, gather, mask, sum per row."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch.input_ids[:, 1:]
    tok = logp.gather(2, targets[..., None]).squeeze(-1)
    mask = torch.zeros_like(targets, dtype=torch.bool)
    T = batch.input_ids.shape[1]
    mask.view(-1)[batch.label_pos - batch.label_pos // T] = True  # position p predicts token p+1 (row-local)
    return (tok * mask).sum(1)


@pytest.fixture
def batch_and_model(tiny_model, tiny_tokenizer):
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Review of Mi:", [" A clever film: superb, even lovely and smart.", " Bland and cold."], "t", 1),
           Example("Hi", [" ok", " no thanks, it was messy and weak and flat."], "t", 2)]
    tok = [tokenize_example(e, tiny_tokenizer) for e in exs]
    batch = collate_padded(tok, tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = load_model(str(tiny_model))
    return batch, model, tok


def test_fused_matches_naive(batch_and_model):
    batch, model, _ = batch_and_model
    fused = sequence_logps(model, batch)
    naive = naive_sequence_logps(model, batch)
    plain = sequence_logps(model, batch, fused=False)
    assert fused.shape == (6,)
    assert torch.allclose(fused, naive, atol=1e-5, rtol=1e-6), (fused, naive)
    assert torch.allclose(plain, naive, atol=1e-5, rtol=1e-6)
    assert (fused < 0).all()


def test_fused_gradients_match_naive(batch_and_model):
    batch, model, _ = batch_and_model
    w = torch.linspace(-1, 1, 6)

    def grads(fn):
        model.zero_grad()
        (fn(model, batch) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_fused, g_naive = grads(sequence_logps), grads(naive_sequence_logps)
    for name in g_naive:
        assert torch.allclose(g_fused[name], g_naive[name], atol=1e-5, rtol=1e-4), name


def test_example_logps_layout_and_dataset_order(batch_and_model, tiny_tokenizer):
    batch, model, tok = batch_and_model
    per_ex = example_logps(model, batch)
    seq = sequence_logps(model, batch)
    assert torch.equal(per_ex[:, 0], seq[:3]) and torch.equal(per_ex[:, 1], seq[3:])
    # dataset_logps sorts by length internally but returns input order, in any batch size
    for bs, layout in ((1, "packed"), (2, "padded"), (8, "packed")):
        d = dataset_logps(model, tok, make_collate(layout, tiny_tokenizer.pad_token_id), batch_size=bs)
        assert torch.allclose(d, per_ex.detach(), atol=1e-5)


def test_label_logprobs_chunking_and_gradcheck():
    torch.manual_seed(0)
    head = nn.Linear(5, 11, bias=True).double()
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    ref = torch.log_softmax(head(h), -1).gather(1, labels[:, None]).squeeze(1)
    for chunk in (1, 3, 7, 100):
        assert torch.allclose(label_logprobs(h, head, labels, chunk=chunk).double(), ref, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: _apply(h_, w_, b_, labels), (h, head.weight, head.bias), eps=1e-6, atol=1e-5)
    # the forward's in-place logsumexp shifts by the row maximum: logits of ~1e4 neither overflow
    # nor lose the label's log-prob (fp32, as training runs it)
    big = nn.Linear(5, 11, bias=True)
    with torch.no_grad():
        big.weight.mul_(3000.0)
    h32 = h.detach().float()
    ref32 = torch.log_softmax(big(h32).double(), -1).gather(1, labels[:, None]).squeeze(1)
    got = label_logprobs(h32, big, labels, chunk=3)
    assert torch.isfinite(got).all() and torch.allclose(got.double(), ref32, rtol=1e-5, atol=1e-2)


def test_label_logprobs_kept_chunk_gives_the_recomputed_gradients():
    """With gradients on, the forward keeps its last chunk's exp(l − max) for the backward instead of
    recomputing the logits: the same gradients (fp64, every chunking, bias or not), and a second
    backward through the same graph (retain_graph) recomputes and agrees too."""
    from directpo.logprobs import _LabelLogProbs

    torch.manual_seed(1)
    for bias in (True, False):
        head = nn.Linear(6, 13, bias=bias).double()
        h = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 13, (9,))
        g = torch.randn(9, dtype=torch.float64)
        params = [h, head.weight] + ([head.bias] if bias else [])
        for chunk in (1, 4, 9, 50):
            grads = {}
            for keep in (False, True):
                out = _LabelLogProbs.apply(h, head.weight, head.bias, labels, chunk, keep)
                grads[keep] = torch.autograd.grad(out, params, g, retain_graph=True)
                again = torch.autograd.grad(out, params, g)
                for a, b in zip(grads[keep], again):
                    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
            for a, b in zip(grads[False], grads[True]):
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (bias, chunk)
    # label_logprobs keeps the buffer when a gradient is wanted, and the backward lets it go
    out = label_logprobs(h, head, labels, chunk=4)
    assert out.grad_fn.kept is not None and out.grad_fn.kept[0].shape == (1, 13)  # the last chunk: row 9
    out.sum().backward()
    assert out.grad_fn.kept is None


def test_label_logprobs_softmax_in_place_and_underflowed_rows():
    """On the CPU each chunk's softmax is taken in place (ATen's kernel writing over its input: equal
    to the out-of-place softmax here, so a torch whose kernel stopped allowing it fails this test), and
    the log-prob is log p; rows whose label probability fell below 2^-100 are recomputed as
    l − logsumexp(l). Log-probs from −1 to −10^4 agree with fp64, both kinds of rows occur."""
    torch.manual_seed(3)
    x = torch.randn(5, 300) * 20
    y = x.clone()
    torch.softmax(y, -1, out=y)
    assert torch.equal(y, torch.softmax(x, -1))
    head = nn.Linear(8, 50, bias=True)
    h = torch.randn(24, 8) * torch.logspace(-1, 3, 24)[:, None]  # logits from ~0.1 to ~10^4
    labels = torch.randint(0, 50, (24,))
    ref = torch.log_softmax(head(h).double(), -1).gather(1, labels[:, None]).squeeze(1)
    assert (ref < -100).sum() >= 3 and (ref > -60).sum() >= 3
    for chunk in (5, 24):
        got = label_logprobs(h, head, labels, chunk=chunk).double()
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (got - ref).abs().max()
    h.requires_grad_(True)  # and the kept buffer is the softmax itself
    out = label_logprobs(h, head, labels, chunk=24)
    kept, sums = out.grad_fn.kept
    assert sums is None and torch.allclose(kept, torch.softmax(head(h), -1), atol=1e-7)


def _apply(h, w, b, labels):
    from directpo.logprobs import _LabelLogProbs
    return _LabelLogProbs.apply(h, w, b, labels, 3)


def test_dpo_gradient_through_model_is_a4(batch_and_model):
    """∇θ L = −β·σ(r̂l − r̂w)·(∇θ log π(yw) − ∇θ log π(yl)) on a real model (eq. A.4)."""
    batch, model, _ = batch_and_model
    beta = 0.5
    with torch.no_grad():
        ref = example_logps(model, batch) - 0.3 * torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    model.zero_grad()
    pol = example_logps(model, batch)
    dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta).losses.sum().backward()
    autograd = {n: p.grad.clone() for n, p in model.named_parameters()}

    weight = torch.sigmoid(beta * ((pol[:, 1] - ref[:, 1]) - (pol[:, 0] - ref[:, 0]))).detach()
    model.zero_grad()
    pol = example_logps(model, batch)
    (-beta * weight * (pol[:, 0] - pol[:, 1])).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, autograd[n], atol=1e-6, rtol=1e-5), n


def test_head_logprobs_runs_the_heads_hooks():
    """The head is called as a module (FSDP2 gathers a sharded head in its hooks): its forward hooks
    run, the result is `label_logprobs`'s, and the module's own forward is back afterwards."""
    from directpo.logprobs import head_logprobs

    torch.manual_seed(0)
    head = nn.Linear(5, 11, bias=False)
    h, labels = torch.randn(7, 5, requires_grad=True), torch.randint(0, 11, (7,))
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].shape)))
    head.register_forward_hook(lambda m, args, out: seen.append(("post", out.shape)))
    got = head_logprobs(head, h, labels)
    assert seen == [("pre", (7, 5)), ("post", (7,))]
    assert torch.equal(got, label_logprobs(h, head, labels))
    assert "forward" not in head.__dict__ and head(h).shape == (7, 11)
    got.sum().backward()
    assert head.weight.grad is not None and h.grad is not None
