"""Speed and memory options: patch dropout (FLIP), gradient checkpointing, channels-last, compile."""

from __future__ import annotations

import functools

import pytest
import torch

from vlp.config import ConfigError, ModelConfig, load_config
from vlp.models.patch_dropout import PatchDropout, set_patch_dropout
from vlp.models.registry import build_model


def _inputs(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size[0]
    return torch.randn(n, 3, size, size, generator=g), torch.randint(1, 400, (n, model.context_length), generator=g)


def _tokens_seen(model, image) -> int:
    """Tokens entering the image tower's transformer."""
    seen = []
    handle = model.visual.ln_pre.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        model.encode_image(image)
    finally:
        handle.remove()
    return seen[0]


def test_patch_dropout_keeps_the_class_token_and_a_random_subset():
    x_BTD = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)
    drop = PatchDropout(0.5).train()
    out = drop(x_BTD)
    assert out.shape == (2, 1 + 4, 3)  # int(8 patches * 0.5) kept
    assert torch.equal(out[:, 0], x_BTD[:, 0])
    for b in range(2):
        rows = {tuple(r) for r in x_BTD[b, 1:].tolist()}
        kept = [tuple(r) for r in out[b, 1:].tolist()]
        assert len(set(kept)) == 4 and set(kept) <= rows
    assert drop.eval()(x_BTD) is x_BTD
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PatchDropout(1.0)


def test_model_patch_dropout_trains_on_fewer_patches_and_evaluates_on_all():
    plain, _, _ = build_model("debug")
    model, _, _ = build_model(ModelConfig(name="debug", patch_dropout=0.75))
    model.load_state_dict(plain.state_dict())
    assert isinstance(model.visual.patch_dropout, PatchDropout) and model.visual.patch_dropout.prob == 0.75
    image, text = _inputs(model)
    patches = (64 // 8) ** 2
    assert _tokens_seen(model.train(), image) == 1 + patches // 4
    assert _tokens_seen(model.eval(), image) == 1 + patches
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(image), plain.eval().encode_image(image))


def test_patch_dropout_needs_a_vit_image_tower():
    class NoVit(torch.nn.Module):
        visual = torch.nn.Identity()

    set_patch_dropout(NoVit(), 0.0)  # nothing asked, nothing to do
    with pytest.raises(ValueError, match="open_clip ViT"):
        set_patch_dropout(NoVit(), 0.5)
    with pytest.raises(ConfigError, match="model.patch_dropout"):
        load_config(None, ["model.patch_dropout=1.0"])


def test_grad_checkpointing_gives_the_same_gradients():
    def grads(**options):
        torch.manual_seed(0)
        model, _, _ = build_model(ModelConfig(name="debug", **options))
        model = model.double().train()
        image, text = _inputs(model)
        out = model(image.double(), text)
        (out["image_features"] @ out["text_features"].T).logsumexp(1).sum().backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model, with_ckpt = grads(grad_checkpointing=True)
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    _, without = grads()
    assert with_ckpt.keys() == without.keys()
    for name, g in without.items():
        assert torch.allclose(with_ckpt[name], g, rtol=1e-10, atol=1e-12), name


def test_channels_last_converts_the_convolution_and_changes_no_output():
    plain, _, _ = build_model("debug")
    model, _, _ = build_model(ModelConfig(name="debug", channels_last=True))
    model.load_state_dict(plain.state_dict())
    assert model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    image, _ = _inputs(model)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(image), plain.eval().encode_image(image), atol=1e-6)


def test_compile_wraps_only_the_training_forward(tmp_path, monkeypatch):
    from vlp.train import trainer as trainer_module

    # dynamo traces vlp's forward for real; the eager backend skips inductor's minutes of C++ builds
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(trainer_module, "get_tokenizer", lambda model_cfg: None)
    losses = {}
    for compiled in (False, True):
        overrides = ["train.device=cpu", f"train.output_dir={tmp_path / str(compiled)}", "eval.tasks=[]",
                     "data.batch_size=4", f"train.compile={str(compiled).lower()}", "train.accum_steps=2"]  # fmt: skip
        trainer = trainer_module.Trainer(load_config(None, overrides))
        assert isinstance(trainer.backend.module, torch._dynamo.eval_frame.OptimizedModule) == compiled
        assert not isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
        image, text = _inputs(trainer.model)
        micro = [{"image": image[:2], "text": text[:2], "caption": [""] * 2},
                 {"image": image[2:], "text": text[2:], "caption": [""] * 2}]  # fmt: skip
        losses[compiled] = [trainer.train_step(micro)[0].item() for _ in range(2)]
        assert "_orig_mod" not in "".join(trainer.model.state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
