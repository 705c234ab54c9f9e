"""Caption generation (vlp.models.generate) on the tiny coca_debug architecture."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vlp
from vlp.models.generate import (
    EOS_ID,
    SOT_ID,
    STRATEGIES,
    GenerationError,
    _filter_top_k_top_p,
    caption_images,
    decode_captions,
    generate_captions,
    max_caption_len,
    sequence_log_probs,
)

PAD = 0


@pytest.fixture(scope="module")
def coca():
    """coca_debug with random weights (vlp initialises the decoder's vocabulary projection, which
    open_clip leaves as torch.empty)."""
    torch.manual_seed(0)
    return vlp.load_model("coca_debug")


class _EosBias(nn.Module):
    """A decoder whose end-of-text logit is raised by ``bias``: makes short captions likely."""

    def __init__(self, decoder: nn.Module, bias: float):
        super().__init__()
        self.decoder, self.bias = decoder, bias

    @property
    def text_projection(self):
        return self.decoder.text_projection

    def forward(self, image_embs, text_embs):
        logits = self.decoder(image_embs, text_embs)
        if isinstance(self.bias, tuple):  # ("mixed", t): images whose first embedding value > t end at once
            first = image_embs[:, 0, 0]
            logits[..., EOS_ID] += torch.where(first > self.bias[1], 50.0, -50.0)[:, None]
        else:
            logits[..., EOS_ID] += self.bias
        return logits


def eos_biased(model, bias: float):
    biased = copy.deepcopy(model)
    biased.text_decoder = _EosBias(biased.text_decoder, bias)
    return biased


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def check_layout(tokens: torch.Tensor, batch: int, max_len: int) -> None:
    """B rows of at most max_len + 1 columns: start-of-text, no special token in the caption,
    pad after end-of-text only."""
    assert tokens.dtype == torch.long and tokens.shape[0] == batch and 2 <= tokens.shape[1] <= max_len + 1
    assert (tokens[:, 0] == SOT_ID).all()
    for row in tokens.tolist():
        body = row[1:]
        end = body.index(EOS_ID) + 1 if EOS_ID in body else len(body)
        caption, after = body[:end], body[end:]
        assert SOT_ID not in caption and PAD not in caption and EOS_ID not in caption[:-1]
        assert all(t == PAD for t in after)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias", [0.0, 4.5, "mixed"])  # 4.5: end-of-text competes; mixed: half end early
def test_every_strategy_returns_the_documented_layout(coca, strategy, bias):
    x = images(6, seed=2)
    if bias == "mixed":  # the threshold: the median over these images (rows that finish may leave the batch)
        with torch.no_grad():
            bias = ("mixed", coca[0]._encode_image(x)[1][:, 0, 0].median().item())
    model = eos_biased(coca[0], bias) if bias else coca[0]
    gen = torch.Generator().manual_seed(0)
    tokens = generate_captions(model, x, strategy=strategy, max_len=12, generator=gen)
    check_layout(tokens, 6, 12)
    if not bias:  # the random model never ends a caption: every row is cut at max_len
        assert tokens.shape[1] == 13 and not (tokens == EOS_ID).any()
    elif isinstance(bias, tuple):  # rows of two lengths: end-of-text then padding after the short ones
        ended = (tokens == EOS_ID).any(1)
        assert 0 < int(ended.sum()) < 6 and tokens.shape[1] == 13
        assert (tokens[ended, 3:] == PAD).all() and not (tokens[~ended] == PAD).any()


@pytest.mark.parametrize("bias", [0.0, 4.0, 4.5, 9.0])
def test_greedy_equals_beam_search_with_one_beam(coca, bias):
    model = eos_biased(coca[0], bias) if bias else coca[0]
    greedy = generate_captions(model, images(4, seed=1), strategy="greedy", max_len=10)
    beam = generate_captions(model, images(4, seed=1), strategy="beam", num_beams=1, max_len=10)
    assert torch.equal(greedy, beam)


def test_sampling_is_reproducible_with_a_seed(coca):
    model, x = coca[0], images(3)

    def sample(seed, **kw):
        return generate_captions(
            model, x, strategy="sample", max_len=10, generator=torch.Generator().manual_seed(seed), **kw
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    greedy = generate_captions(model, x, strategy="greedy", max_len=10)
    assert torch.equal(sample(3, top_k=1), greedy)  # one candidate left: the argmax
    assert torch.equal(sample(3, top_p=1e-6), greedy)
    nucleus = sample(5, top_k=5, top_p=0.9, temperature=0.7)
    check_layout(nucleus, 3, 10)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_repetition_penalty_stops_repeats(coca, strategy):
    x = images(4)
    plain = generate_captions(coca[0], x, strategy=strategy, max_len=12)
    assert any(len(set(row[1:])) < 12 for row in plain.tolist())  # the random model repeats itself
    penalised = generate_captions(coca[0], x, strategy=strategy, max_len=12, repetition_penalty=1e6)
    assert all(len(set(row[1:])) == 12 for row in penalised.tolist())


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: _filter_top_k_top_p(logits, **kw).isfinite()[0].tolist()  # noqa: E731
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(top_k=0, top_p=0.8) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.81) == [True, True, True, False]
    assert kept(top_k=3, top_p=0.9) == [True, True, True, False]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_min_len_forbids_an_early_end(coca, strategy):
    model = eos_biased(coca[0], 40.0)  # end-of-text is the first choice whenever it is allowed
    gen = torch.Generator().manual_seed(0)
    for min_len in (0, 1, 4):
        tokens = generate_captions(model, images(3), strategy=strategy, min_len=min_len, max_len=8, generator=gen)
        first_eos = (tokens == EOS_ID).long().argmax(dim=1)  # column = number of new tokens
        assert (tokens == EOS_ID).any(dim=1).all()
        assert (first_eos == max(min_len, 1)).all(), (min_len, tokens)


@pytest.mark.parametrize("bias", [0.0, 4.0, 4.5])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_scores_at_least_greedy(coca, bias, length_penalty):
    """Under the model (a teacher-forced forward), the best beam is no worse than greedy's caption."""
    model, x = (eos_biased(coca[0], bias) if bias else coca[0]), images(6, seed=2)
    scores = {}
    for strategy in ("greedy", "beam"):
        tokens = generate_captions(model, x, strategy=strategy, max_len=12, length_penalty=length_penalty)
        lengths = (tokens[:, 1:] != PAD).sum(dim=1).float()
        scores[strategy] = sequence_log_probs(model, x, tokens) / lengths**length_penalty
    assert (scores["beam"] >= scores["greedy"] - 1e-4).all(), scores


def test_sequence_log_probs_is_the_caption_loss(coca):
    """The teacher-forced score is minus the summed cross-entropy of CoCa's forward (pad ignored)."""
    model, _, tokenizer = coca
    x, text = images(2), tokenizer(["a red circle", "two small blue squares on grass"])
    out = model(x, text)
    nll = F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=PAD, reduction="none").sum(1)
    torch.testing.assert_close(sequence_log_probs(model, x, text), -nll, rtol=1e-5, atol=1e-4)


def test_errors_are_clear(coca):
    model, x = coca[0], images(1)
    assert max_caption_len(model) == 31  # context 32: start-of-text + 31 tokens, as in training
    with pytest.raises(GenerationError, match="unknown generation strategy 'nucleus'"):
        generate_captions(model, x, strategy="nucleus")
    clip, _, _ = vlp.load_model("debug")
    with pytest.raises(GenerationError, match="no text decoder"):
        generate_captions(clip, x)
    with pytest.raises(GenerationError, match=r"max_len must be in \[1, 31\]"):
        generate_captions(model, x, max_len=32)
    with pytest.raises(GenerationError, match="min_len"):
        generate_captions(model, x, max_len=5, min_len=6)
    for bad in ({"top_p": 0.0}, {"num_beams": 0}, {"temperature": 0.0}, {"top_k": -1}):
        with pytest.raises(GenerationError, match=next(iter(bad))):
            generate_captions(model, x, **bad)
    with pytest.raises(GenerationError, match="B x 3 x H x W"):
        generate_captions(model, x[0])


def test_caption_images_decodes_text_and_keeps_the_mode(coca):
    model, preprocess, tokenizer = coca
    pil = [Image.new("RGB", (80, 64), color) for color in ("red", "blue")]
    model.train()
    try:
        texts = caption_images(model, tokenizer, pil, preprocess, strategy="greedy", max_len=6)
        assert model.training
    finally:
        model.eval()
    tokens = generate_captions(model, torch.stack([preprocess(im) for im in pil]), strategy="greedy", max_len=6)
    assert texts == decode_captions(tokenizer, tokens) and len(texts) == 2
    assert all(isinstance(t, str) and t == t.strip() and "<" not in t for t in texts)
    assert decode_captions(tokenizer, tokenizer(["A red circle!"])) == ["a red circle !"]
    with pytest.raises(GenerationError, match="preprocess"):
        caption_images(model, tokenizer, pil)


def test_a_briefly_trained_model_says_its_captions():
    """40 Adam steps on 3 images with one caption each; greedy and beam search then reproduce them."""
    torch.manual_seed(0)
    model, _, tokenizer = vlp.load_model("coca_debug")
    nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    captions = ["a red circle", "two blue squares", "a small green star"]
    x, text = images(3, seed=0), tokenizer(captions)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        out = model(x, text)
        loss = F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert caption_images(model, tokenizer, x, strategy="greedy") == captions
    assert caption_images(model, tokenizer, x, strategy="beam") == captions
