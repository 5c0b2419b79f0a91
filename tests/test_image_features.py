"""A frozen vision side's image features computed once per image and kept (issue #30, speed):
log-probs and gradients with the kept features equal the plain path (pixels, the tower at every
forward) for Qwen2-VL, Qwen2.5-VL, LLaVA and Idefics3, padded and packed (LLaVA-NeXT refused);
when the cache is not used; the tower and the processor run once per distinct image over a
2-epoch run."""
import copy

import pytest
import torch

from directpo.config import ConfigError
from directpo.data.collate import collate_packed, collate_padded
from directpo.data.formats import load_examples
from directpo.data.image_features import FAMILIES, FeatureCache, attach, detach, forward_inputs, why_not
from directpo.data.vision_tokenize import tokenize_vision_examples
from directpo.logprobs import per_example, sum_per_sequence, token_logps
from directpo.toy import MROPE_FAMILIES, VLM_FAMILIES, build_tiny_vlm, colour_image_task
from directpo.training import TrainConfig
from directpo.training.vlm import freeze_vision
from directpo.vision import load_processor, load_vision_model, vision_modules
from test_vision_logprobs import TEXTS, TOWERS, _two_image_rows, per_sequence
from conftest import spread_weights

SUM_TOL = dict(atol=1e-5, rtol=1e-6)


# the families whose cached path is tested exact (the cache refuses the others: test_other_families_are_refused)
@pytest.fixture(scope="module", params=[f for f in VLM_FAMILIES if f in FAMILIES])
def setup(request, tmp_path_factory):
    """(family, model (weights spread out, vision side frozen), processor, tokenized examples: 2
    colour-task rows, 2 two-image rows, and the first colour row again (a repeated image))."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"feat_{family}")
    model_dir = build_tiny_vlm(tmp / "model", family, TEXTS, seed=0)
    model, processor = load_vision_model(str(model_dir)), load_processor(str(model_dir))
    spread_weights(model)
    freeze_vision(model)
    train, _ = colour_image_task(tmp / "task", n_train=4, n_eval=1)
    colour = load_examples(str(train))[:2]
    tokenized, _ = tokenize_vision_examples(colour + _two_image_rows(tmp) + colour[:1], processor)
    return family, model, processor, tokenized


def _grads(model, batch, weights, **kw):
    """(per-sequence token log-probs, (B, K) sums, gradients of Σ weights · log-probs of every trainable parameter)."""
    model.zero_grad(set_to_none=True)
    tokens = token_logps(model, batch, **kw)
    lp = per_example(batch, sum_per_sequence(tokens, batch))
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return per_sequence(tokens.detach(), batch), lp.detach(), grads


def _tower(model):
    return next(getattr(model.model, t) for t in TOWERS if hasattr(model.model, t))


class _Counter:
    """Calls of the vision tower, and of the processor on images."""

    def __init__(self, model, processor, monkeypatch):
        self.tower, self.processor = 0, 0
        self._handle = _tower(model).register_forward_pre_hook(self._count_tower)
        import directpo.data.vision_tokenize as vt

        encode = vt._encode

        def counted(*args, **kwargs):
            self.processor += 1
            return encode(*args, **kwargs)

        monkeypatch.setattr(vt, "_encode", counted)

    def _count_tower(self, *_):
        self.tower += 1

    def close(self):
        self._handle.remove()


@pytest.mark.parametrize("layout", ["padded", "packed", "packed_one_row"])
def test_cached_features_equal_the_plain_path(setup, layout, monkeypatch):
    """Log-probs and the gradient of every trainable parameter, with the features computed now and
    kept (first pass) and taken from the cache (second pass), equal the plain path's (pixels)."""
    family, model, processor, tokenized = setup
    pad = processor.tokenizer.pad_token_id
    batch = collate_padded(tokenized, pad) if layout == "padded" else \
        collate_packed(tokenized, pad, 4096 if layout == "packed_one_row" else None)
    weights = torch.randn(len(tokenized), 2, generator=torch.Generator().manual_seed(1))
    tok_ref, lp_ref, g_ref = _grads(model, batch, weights)
    assert g_ref and any(g.abs().max() > 0 for g in g_ref.values())
    assert any("embed_tokens" in n for n in g_ref)  # the token embeddings train: their gradient is compared
    cache = FeatureCache(1 << 30)
    assert attach(model, cache, vision_modules(model)) is None
    counter = _Counter(model, processor, monkeypatch)
    try:
        for segmented in (True, False) if layout != "padded" else (True,):
            for fused in (True, False):
                tok, lp, g = _grads(model, batch, weights, segmented=segmented, fused=fused)
                for a, b in zip(tok, tok_ref, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
                torch.testing.assert_close(lp, lp_ref, **SUM_TOL)
                assert g.keys() == g_ref.keys()
                for name in g_ref:
                    torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    finally:
        counter.close()
        detach(model)
    distinct = len({ex.vision.digest for ex in tokenized})
    assert distinct == len(tokenized) - 1  # (the repeated row)
    # each distinct example's images through the tower and the processor once, whatever the passes
    assert (counter.tower, counter.processor) == (distinct, distinct)
    assert len(cache) == cache.computed == distinct and cache.reused > 0


def test_a_full_cache_keeps_nothing_and_changes_nothing(setup, capsys, monkeypatch):
    family, model, processor, tokenized = setup
    batch = collate_packed(tokenized, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        want = token_logps(model, batch)
        cache = FeatureCache(1)  # no example's features fit
        attach(model, cache, vision_modules(model))
        counter = _Counter(model, processor, monkeypatch)
        try:
            capsys.readouterr()
            got = [token_logps(model, batch) for _ in range(2)]
        finally:
            counter.close()
            detach(model)
    for g in got:
        assert torch.equal(g, got[0])
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)
    assert len(cache) == 0 and cache.bytes == 0
    assert capsys.readouterr().err.count("image feature cache full") == 1  # said once
    distinct = len({ex.vision.digest for ex in tokenized})
    assert counter.tower == 2 * distinct  # computed again whenever a batch needs them


def test_another_tower_gets_its_own_features(setup):
    """One store for two models whose towers differ (πref's may): each gets its own tower's features."""
    family, model, processor, tokenized = setup
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in _tower(other).parameters():
            p.mul_(1.5)
    batch = collate_packed(tokenized, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        want = [token_logps(m, batch) for m in (model, other)]
        assert (want[0] - want[1]).abs().max() > 1e-3  # the towers really differ
        cache = FeatureCache(1 << 30)
        for m in (model, other):
            attach(m, cache, vision_modules(m))
        try:
            got = [token_logps(m, batch) for m in (model, other, model, other)]
        finally:
            detach(model)
    for g, w in zip(got, want + want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert cache.computed == 2 * len({ex.vision.digest for ex in tokenized})


def test_not_used_where_it_could_change_results(setup):
    family, model, processor, tokenized = setup
    side = vision_modules(model)
    assert why_not(model, side) is None
    trained = copy.deepcopy(model)
    next(_tower(trained).parameters()).requires_grad_(True)  # --no-freeze-vision
    assert "trains" in why_not(trained, vision_modules(trained))
    batch = collate_padded(tokenized, processor.tokenizer.pad_token_id)
    assert attach(trained, FeatureCache(1 << 30), vision_modules(trained)) is not None
    assert "pixel_values" in forward_inputs(trained, batch)  # pixels as before
    if family in MROPE_FAMILIES:
        from directpo.training.lora import apply_lora

        adapted = apply_lora(copy.deepcopy(model), 4, 8, "qkv", 0.0)  # adapters in the tower (frozen here)
        for p in adapted.parameters():
            p.requires_grad_(False)
        assert "adapter" in why_not(adapted, vision_modules(adapted))
    dropped = copy.deepcopy(model)
    dropped.config.vision_config.attention_dropout = 0.1
    assert "dropout" in why_not(dropped, vision_modules(dropped))


@pytest.mark.parametrize("family", [f for f in VLM_FAMILIES if f not in FAMILIES])
def test_other_families_are_refused(family, tmp_path):
    """LLaVA-NeXT: its features end with `image_newline`, a parameter of the model itself (no child of
    the vision side), which trains under --freeze-vision: kept features would go stale."""
    model = load_vision_model(str(build_tiny_vlm(tmp_path, family, TEXTS)))
    freeze_vision(model)
    assert why_not(model, vision_modules(model)).startswith(f"not checked for {family}")


def test_a_frozen_side_unfrozen_later_goes_back_to_pixels(setup):
    family, model, processor, tokenized = setup
    m = copy.deepcopy(model)
    attach(m, FeatureCache(1 << 30), vision_modules(m))
    batch = collate_padded(tokenized, processor.tokenizer.pad_token_id)
    assert "mm_encoder_outputs" in forward_inputs(m, batch) and "pixel_values" not in forward_inputs(m, batch)
    next(_tower(m).parameters()).requires_grad_(True)
    assert "pixel_values" in forward_inputs(m, batch)


def test_the_setting(tmp_path):
    given = dict(model="m", data="d", output_dir=str(tmp_path / "out"))
    assert TrainConfig(**given).image_feature_cache == "1GiB"
    TrainConfig(**given, image_feature_cache="off").validate()
    TrainConfig(**given, image_feature_cache="64MiB").validate()
    with pytest.raises(ConfigError, match="--image-feature-cache 'lots'"):
        TrainConfig(**given, image_feature_cache="lots").validate()


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """A tiny Qwen2-VL and 8 colour-task pairs (8 distinct pictures)."""
    tmp = tmp_path_factory.mktemp("feat_run")
    train, _ = colour_image_task(tmp / "task", n_train=8, n_eval=1, seed=0)
    return build_tiny_vlm(tmp / "model", "qwen2_vl", TEXTS, seed=0), train


def _counted_run(qwen_run, out, monkeypatch, **settings):
    """A 2-epoch DPO run; (images through the tower, images made by the processor after tokenization, final weights)."""
    import directpo
    import directpo.training.prepare as prepare
    from directpo.data.vision_tokenize import ImageInputs

    model_dir, train = qwen_run
    counts = {"tower": 0, "pixels": 0}
    load = prepare.load_vision_model

    def counted_load(*args, **kwargs):
        model = load(*args, **kwargs)
        def images_fed(module, args, kwargs):  # (Qwen2-VL's tower takes patch rows and a grid per image)
            counts["tower"] += kwargs["grid_thw"].shape[0]

        model.model.visual.register_forward_pre_hook(images_fed, with_kwargs=True)
        return model

    tensors = ImageInputs.tensors

    def counted_tensors(self):
        counts["pixels"] += 1
        return tensors(self)

    monkeypatch.setattr(prepare, "load_vision_model", counted_load)
    monkeypatch.setattr(ImageInputs, "tensors", counted_tensors)
    directpo.train(model=str(model_dir), data=str(train), output_dir=str(out), lr=1e-3, optimizer="adamw",
                   batch_size=4, micro_batch_size=2, epochs=2, warmup_steps=1, progress=False, threads=1,
                   ref_cache="off", **settings)
    from safetensors.torch import load_file

    return counts["tower"], counts["pixels"], load_file(out / "model.safetensors")


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_the_tower_runs_once_per_distinct_image_over_two_epochs(qwen_run, tmp_path, monkeypatch, capsys,
                                                                precompute_ref):
    """With the cache (the default), over 2 epochs of 2 steps each (πref precomputed: its pass fills
    the cache; or live: a copy of the policy sharing its frozen tower's features), the tower encodes
    each distinct picture once and the processor makes each picture's pixels once; without it, at every
    forward. The final weights agree."""
    pictures = 8
    tower, pixels, cached = _counted_run(qwen_run, tmp_path / "cached", monkeypatch, precompute_ref=precompute_ref)
    assert "image features: computed once per image and kept" in capsys.readouterr().err
    assert (tower, pixels) == (pictures, pictures)
    tower_off, pixels_off, plain = _counted_run(qwen_run, tmp_path / "off", monkeypatch,
                                                precompute_ref=precompute_ref, image_feature_cache="off")
    # the reference pass (or πref live at each step) and 2 epochs of the policy, every picture each
    # time; the pixels made for each batch (πref live reads the policy's batch)
    assert tower_off >= 3 * pictures and pixels_off >= 2 * pictures
    assert cached.keys() == plain.keys()
    assert any(not torch.equal(cached[k], load_vision_state(qwen_run)[k]) for k in cached)  # it trained
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], atol=1e-5, rtol=1e-4, msg=k)


def load_vision_state(qwen_run):
    from safetensors.torch import load_file

    return load_file(qwen_run[0] / "model.safetensors")


def test_the_vision_bench_says_whether_the_features_were_kept(tmp_path):
    from directpo.bench import vision as vb

    run = {"pairs_per_s": 2.0, "peak_rss_mib": 400.0, "above_import_mib": 100.0, "trainable_params": 5}
    results = [vb._summary("d", "directpo", True, [{**run, "image_feature_cache": True}]),
               vb._summary("e", "directpo", False, [{**run, "image_feature_cache": False}]),
               vb._summary("t", "trl", False, [run])]
    table = vb.format_table({"settings": {"model_desc": "m", "pairs": 4, "image_size": 56, "batch": 2,
                                          "micro_batch": 2, "steps": 1, "rounds": 1}, "results": results,
                             "ratios": []})
    assert "| d, image features cached | 2.00 |" in table and "| e, image features at every step | 2.00 |" in table
    assert "| t | 2.00 |" in table
    # what run_one looks for is what training logs
    import directpo.training.vlm as vlm
    import inspect

    assert vb.FEATURES_KEPT in inspect.getsource(vlm.cache_image_features)


def test_pending_bytes_is_what_the_cache_grows_by(setup):
    """What `--memory-budget` may add for features not kept yet: exactly what filling the cache takes."""
    from directpo.data.image_features import pending_bytes

    family, model, processor, tokenized = setup
    assert pending_bytes(model, tokenized) == 0  # not attached: nothing will be kept
    cache = FeatureCache(1 << 30)
    attach(model, cache, vision_modules(model))
    try:
        before = pending_bytes(model, tokenized)
        with torch.no_grad():
            token_logps(model, collate_packed(tokenized[:2], processor.tokenizer.pad_token_id))
        assert 0 < cache.bytes < before
        assert pending_bytes(model, tokenized) == before - cache.bytes
        with torch.no_grad():
            token_logps(model, collate_packed(tokenized, processor.tokenizer.pad_token_id))
        assert cache.bytes == before and pending_bytes(model, tokenized) == 0
        attach(model, FeatureCache(100), vision_modules(model))  # a bound below the features
        assert before > 100 and pending_bytes(model, tokenized + tokenized) == 100
    finally:
        detach(model)


def test_vision_weights_written_in_place_are_fingerprinted_again(setup):
    """A frozen tower written since it was attached (a checkpoint loaded, TR-DPO's πref update)
    gets its new weights' features, not the kept ones."""
    family, model, processor, tokenized = setup
    m = copy.deepcopy(model)
    batch = collate_packed(tokenized, processor.tokenizer.pad_token_id)
    cache = FeatureCache(1 << 30)
    attach(m, cache, vision_modules(m))
    with torch.no_grad():
        before = token_logps(m, batch)
        for p in _tower(m).parameters():
            p.mul_(0.5).add_(p.clone(), alpha=1.0)  # TR-DPO's mix of two equal weights: the same values
        assert torch.equal(token_logps(m, batch), before) and cache.computed == len(cache)  # kept ones reused
        reused = cache.reused
        for p in _tower(m).parameters():
            p.mul_(1.5)
        got = token_logps(m, batch)
        detach(m)
        want = token_logps(m, batch)
    assert (want - before).abs().max() > 1e-3  # the tower really changed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.reused == reused and cache.computed == 2 * len({ex.vision.digest for ex in tokenized})


def test_a_run_training_the_tower_says_it_keeps_no_features(qwen_run, tmp_path, monkeypatch, capsys):
    tower, pixels, _ = _counted_run(qwen_run, tmp_path / "trained", monkeypatch, freeze_vision=False)
    assert "image features: computed at every step (the vision tower or projector trains" in capsys.readouterr().err
    assert tower >= 3 * 8 and pixels >= 3 * 8  # the reference pass and 2 epochs, every picture each time
