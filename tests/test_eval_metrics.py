"""Metric layer of the evaluator: hand-computed cases, blocking invariance, CLIP_benchmark equality.

Shape legend: N images/samples, M texts, C classes, D embedding dim, L token length.
"""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlp.eval.retrieval import paired_retrieval_metrics, retrieval_chance, retrieval_metrics
from vlp.eval.zeroshot import build_classifier, classification_metrics, rank_of_target, zeroshot_classify

# ---------------------------------------------------------------- fakes


def word_tokenizer(texts: list[str]) -> torch.Tensor:
    """Texts are space-separated integer ids of equal length: "3 101" -> [3, 101]."""
    return torch.tensor([[int(word) for word in text.split()] for text in texts])


class BagOfWordsEncoder:
    """encode_text = sum of per-token embeddings (deliberately not normalised)."""

    def __init__(self, vocab: int, dim: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.table_VD = torch.randn(vocab, dim, generator=gen) * 3
        self.calls: list[int] = []

    def __call__(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        self.calls.append(tokens_BL.shape[0])
        return self.table_VD[tokens_BL].sum(dim=1)


# ---------------------------------------------------------------- classification by hand

# Four classes, five samples. Ties rank the lower class index first.
HAND_LOGITS_NC = torch.tensor(
    [
        [0.9, 0.1, 0.3, 0.2],  # label 0: rank 1, pred 0
        [0.5, 0.5, 0.1, 0.0],  # label 1: tied with class 0, which goes first -> rank 2, pred 0
        [0.5, 0.5, 0.1, 0.0],  # label 0: same tie, now in our favour -> rank 1, pred 0
        [0.1, 0.2, 0.3, 0.4],  # label 0: last -> rank 4, pred 3
        [0.0, 0.7, 0.7, 0.7],  # label 2: three-way tie, class 1 first -> rank 2, pred 1
    ]
)
HAND_LABELS_N = torch.tensor([0, 1, 0, 0, 2])


def test_rank_of_target_by_hand():
    assert rank_of_target(HAND_LOGITS_NC, HAND_LABELS_N).tolist() == [1, 2, 1, 4, 2]


def test_classification_metrics_by_hand():
    got = classification_metrics(HAND_LOGITS_NC, HAND_LABELS_N, topk=(1, 2, 3, 4))
    # ranks [1, 2, 1, 4, 2]
    assert got["acc1"] == pytest.approx(2 / 5)
    assert got["acc2"] == pytest.approx(4 / 5)
    assert got["acc3"] == pytest.approx(4 / 5)
    assert got["acc4"] == pytest.approx(1.0)
    # preds [0, 0, 0, 3, 1]; class 0 (samples 0, 2, 3): 2/3; class 1: 0/1; class 2: 0/1;
    # class 3 is only predicted, never true, so it is not averaged: (2/3 + 0 + 0) / 3
    assert got["mean_per_class_recall"] == pytest.approx(2 / 9)
    assert all(isinstance(v, float) for v in got.values())


def test_acc5_is_nan_with_fewer_than_five_classes():
    got = classification_metrics(HAND_LOGITS_NC, HAND_LABELS_N)
    assert set(got) == {"acc1", "acc5", "mean_per_class_recall"}
    assert got["acc1"] == pytest.approx(2 / 5)
    assert math.isnan(got["acc5"])


def test_rank_of_target_matches_stable_sort_under_heavy_ties():
    gen = torch.Generator().manual_seed(1)
    scores_NC = torch.randint(0, 3, (200, 9), generator=gen).float()
    target_N = torch.randint(0, 9, (200,), generator=gen)
    order_NC = torch.sort(scores_NC, dim=1, descending=True, stable=True).indices
    expected_N = (order_NC == target_N[:, None]).float().argmax(dim=1) + 1
    assert torch.equal(rank_of_target(scores_NC, target_N), expected_N)


@pytest.mark.parametrize(
    "logits, labels",
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long)),
        (torch.zeros(3, 4), torch.tensor([0, 1, 4])),
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0])),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
    ],
)
def test_classification_metrics_rejects_bad_inputs(logits, labels):
    with pytest.raises(ValueError):
        classification_metrics(logits, labels)


def test_zeroshot_classify_adds_counts_and_chance():
    gen = torch.Generator().manual_seed(2)
    img_ND = F.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    w_DC = F.normalize(torch.randn(8, 6, generator=gen), dim=0)
    labels_N = torch.randint(0, 6, (30,), generator=gen)
    got = zeroshot_classify(img_ND, w_DC, labels_N)
    assert got == {
        **classification_metrics(100.0 * img_ND @ w_DC, labels_N),
        "num_samples": 30,
        "num_classes": 6,
        "chance": 1 / 6,
    }


# ---------------------------------------------------------------- classifier building

TEMPLATES = ["{c} 100", "101 {c}", lambda c: f"{c} 102"]


def test_build_classifier_is_renormalised_mean_of_normalised_templates():
    encoder = BagOfWordsEncoder(vocab=110, dim=5)
    classnames = ["3", "7", "9"]
    w_DC = build_classifier(encoder, word_tokenizer, classnames, TEMPLATES, batch_size=2)
    assert w_DC.shape == (5, 3)
    for c, name in enumerate(classnames):
        tokens_TL = torch.tensor([[int(name), 100], [101, int(name)], [int(name), 102]])
        per_template_TD = F.normalize(encoder.table_VD[tokens_TL].sum(dim=1), dim=-1)
        expected_D = F.normalize(per_template_TD.mean(dim=0), dim=0)
        torch.testing.assert_close(w_DC[:, c], expected_D)
    assert torch.allclose(w_DC.norm(dim=0), torch.ones(3))


def test_build_classifier_batches_prompts():
    encoder = BagOfWordsEncoder(vocab=110, dim=5)
    w_big = build_classifier(encoder, word_tokenizer, ["1", "2", "3"], TEMPLATES)
    encoder.calls.clear()
    w_small = build_classifier(encoder, word_tokenizer, ["1", "2", "3"], TEMPLATES, batch_size=2)
    assert encoder.calls == [2, 1, 2, 1, 2, 1]  # 3 templates per class, each class on its own
    torch.testing.assert_close(w_small, w_big)


def test_build_classifier_rejects_template_without_placeholder():
    encoder = BagOfWordsEncoder(vocab=110, dim=5)
    with pytest.raises(ValueError, match=r"'100 101'.*\{c\}"):
        build_classifier(encoder, word_tokenizer, ["1"], ["{c} 100", "100 101"])
    with pytest.raises(ValueError, match="other than"):
        build_classifier(encoder, word_tokenizer, ["1"], ["{c} {x}"])
    with pytest.raises(ValueError, match="classnames is empty"):
        build_classifier(encoder, word_tokenizer, [], ["{c} 100"])
    with pytest.raises(ValueError, match="templates is empty"):
        build_classifier(encoder, word_tokenizer, ["1"], [])
    assert encoder.calls == []


# ---------------------------------------------------------------- retrieval by hand

# With one-hot image features, text row m *is* its similarity row to images 0, 1, 2 (nothing is
# renormalised, so unnormalised rows are fine here). Two captions per image.
HAND_IMAGES_ND = torch.eye(3)
HAND_TEXTS_MD = torch.tensor(
    [
        [0.9, 0.1, 0.0],  # t0 -> img0: rank 1
        [0.2, 0.8, 0.1],  # t1 -> img0: img1 above -> rank 2
        [0.1, 0.7, 0.3],  # t2 -> img1: rank 1
        [0.5, 0.4, 0.6],  # t3 -> img1: img0, img2 above -> rank 3
        [0.3, 0.3, 0.3],  # t4 -> img2: all tied, img0 and img1 go first -> rank 3
        [0.0, 0.2, 0.2],  # t5 -> img2: tied with img1, which goes first -> rank 2
    ]
)
HAND_TEXT_TO_IMAGE_M = torch.tensor([0, 0, 1, 1, 2, 2])


def test_retrieval_metrics_by_hand_multi_caption():
    got = retrieval_metrics(HAND_IMAGES_ND, HAND_TEXTS_MD, HAND_TEXT_TO_IMAGE_M, ks=(1, 2, 3, 10))
    # image retrieval ranks per text: [1, 2, 1, 3, 3, 2]
    assert got["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert got["image_retrieval_recall@2"] == pytest.approx(4 / 6)
    assert got["image_retrieval_recall@3"] == 1.0
    assert got["image_retrieval_recall@10"] == 1.0  # k > 3 images: clamped
    assert got["image_retrieval_mean_rank"] == pytest.approx(12 / 6)
    # text retrieval, per image column over t0..t5:
    #   img0 [.9 .2 .1 .5 .3 .0], captions t0, t1: t0 is first            -> rank 1
    #   img1 [.1 .8 .7 .4 .3 .2], captions t2, t3: t2 behind t1            -> rank 2
    #   img2 [.0 .1 .3 .6 .3 .2], captions t4, t5: t4 (.3) behind t3 (.6)
    #        and behind t2 (.3, tied, lower index)                         -> rank 3
    assert got["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert got["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert got["text_retrieval_recall@3"] == 1.0
    assert got["text_retrieval_recall@10"] == 1.0  # k > 6 texts: clamped
    assert got["text_retrieval_mean_rank"] == pytest.approx(6 / 3)
    assert (got["num_images"], got["num_texts"]) == (3, 6)


def random_multi_caption(num_images: int, extra_texts: int, dim: int, seed: int, integer: bool = False):
    """Random features and a shuffled text->image map where every image has at least one text."""
    gen = torch.Generator().manual_seed(seed)
    owners = torch.cat([torch.arange(num_images), torch.randint(0, num_images, (extra_texts,), generator=gen)])
    text_to_image_M = owners[torch.randperm(len(owners), generator=gen)]
    if integer:  # small integers: exact dot products and many ties
        img_ND = torch.randint(-1, 2, (num_images, dim), generator=gen).float()
        txt_MD = torch.randint(-1, 2, (len(owners), dim), generator=gen).float()
        return img_ND, txt_MD, text_to_image_M
    img_ND = F.normalize(torch.randn(num_images, dim, generator=gen), dim=-1)
    txt_MD = F.normalize(torch.randn(len(owners), dim, generator=gen), dim=-1)
    return img_ND, txt_MD, text_to_image_M


@pytest.mark.parametrize("integer", [False, True])
def test_blocked_equals_unblocked(integer):
    img_ND, txt_MD, t2i_M = random_multi_caption(37, 80, dim=6, seed=3, integer=integer)
    ks = (1, 5, 10, 50)
    full = retrieval_metrics(img_ND, txt_MD, t2i_M, ks=ks, block_size=10_000)
    for block_size in (1, 2, 7, 36, 37, 117):
        assert retrieval_metrics(img_ND, txt_MD, t2i_M, ks=ks, block_size=block_size) == full


def reference_ranks(img_ND, txt_MD, t2i_M):
    """Unblocked ranks from a stable descending sort of the full similarity matrix."""
    sim_MN = txt_MD @ img_ND.T
    order_MN = torch.sort(sim_MN, dim=1, descending=True, stable=True).indices
    image_rank_M = (order_MN == t2i_M[:, None]).float().argmax(dim=1) + 1
    order_NM = torch.sort(sim_MN.T, dim=1, descending=True, stable=True).indices
    is_caption_NM = t2i_M[order_NM] == torch.arange(len(img_ND))[:, None]
    text_rank_N = is_caption_NM.float().argmax(dim=1) + 1  # first caption in the order
    return image_rank_M, text_rank_N


def test_mean_ranks_and_recalls_match_full_sort_with_ties():
    img_ND, txt_MD, t2i_M = random_multi_caption(25, 60, dim=5, seed=4, integer=True)
    image_rank_M, text_rank_N = reference_ranks(img_ND, txt_MD, t2i_M)
    got = retrieval_metrics(img_ND, txt_MD, t2i_M, ks=(1, 3, 10), block_size=4)
    assert got["image_retrieval_mean_rank"] == pytest.approx(image_rank_M.double().mean().item())
    assert got["text_retrieval_mean_rank"] == pytest.approx(text_rank_N.double().mean().item())
    for k in (1, 3, 10):
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx((image_rank_M <= k).double().mean().item())
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx((text_rank_N <= k).double().mean().item())


def test_paired_retrieval_metrics():
    gen = torch.Generator().manual_seed(5)
    img_ND = F.normalize(torch.randn(12, 4, generator=gen), dim=-1)
    txt_ND = F.normalize(img_ND + 0.5 * torch.randn(12, 4, generator=gen), dim=-1)
    got = paired_retrieval_metrics(img_ND, txt_ND, ks=(1, 5), block_size=5)
    assert got == retrieval_metrics(img_ND, txt_ND, torch.arange(12), ks=(1, 5))
    with pytest.raises(ValueError, match="as many texts as images"):
        paired_retrieval_metrics(img_ND, txt_ND[:11])


def test_retrieval_rejects_image_without_text_and_bad_k():
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3), ks=(0,))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))


def test_retrieval_chance():
    assert retrieval_chance(100, 100, 5) == {
        "image_retrieval_recall@5": 0.05,
        "text_retrieval_recall@5": pytest.approx(0.05),
    }
    # 2 images, 5 texts: captions split 3 + 2; P(hit) = 1 - C(M - m, k) / C(M, k)
    for k in (1, 2, 3, 4):
        expected = 1 - (math.comb(2, k) / math.comb(5, k) + math.comb(3, k) / math.comb(5, k)) / 2
        got = retrieval_chance(2, 5, k)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(expected)
        assert got[f"image_retrieval_recall@{k}"] == min(k, 2) / 2
    with pytest.raises(ValueError):
        retrieval_chance(5, 4, 1)


# ---------------------------------------------------------------- equality with CLIP_benchmark


@pytest.fixture
def cb_classification(monkeypatch):
    """clip_benchmark's zeroshot_classification module with its accuracy() made numpy>=2.4-safe.

    Its accuracy() calls float() on a 1-element array, which numpy 2.4 refuses; shadowing the
    builtin in that module's globals keeps its code as is and only converts through .item().
    """
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    monkeypatch.setattr(zc, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    return zc


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_accuracy_and_balanced_accuracy_match_clip_benchmark(cb_classification):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(6)
    logits_NC = torch.randn(500, 20, generator=gen)
    labels_N = torch.randint(0, 17, (500,), generator=gen)  # classes 17..19 never true
    acc1, acc5 = cb_classification.accuracy(logits_NC, labels_N, topk=(1, 5))
    balanced = sklearn_metrics.balanced_accuracy_score(labels_N, logits_NC.argmax(axis=1))
    got = classification_metrics(logits_NC, labels_N)
    assert got["acc1"] == pytest.approx(acc1, rel=1e-12)
    assert got["acc5"] == pytest.approx(acc5, rel=1e-12)
    assert got["mean_per_class_recall"] == pytest.approx(balanced, rel=1e-12)


class _FakeClip:
    """CLIP-like model over lookup tables: images are indices, texts are bag-of-words ids."""

    def __init__(self, image_table_ND: torch.Tensor, encoder: BagOfWordsEncoder):
        self.image_table_ND = image_table_ND
        self.encoder = encoder

    def encode_image(self, idx_B):
        return self.image_table_ND[idx_B]

    def encode_text(self, tokens_BL):
        return self.encoder(tokens_BL)


class _Loader(list):
    """A list of batches with the ``dataset.classes`` attribute CLIP_benchmark reads."""

    def __init__(self, batches, classes):
        super().__init__(batches)
        self.dataset = type("Dataset", (), {"classes": classes})()


@pytest.mark.parametrize("num_classes", [3, 12])
def test_zeroshot_pipeline_matches_clip_benchmark_evaluate(cb_classification, num_classes):
    gen = torch.Generator().manual_seed(7)
    encoder = BagOfWordsEncoder(vocab=110, dim=16, seed=8)
    image_table_ND = torch.randn(90, 16, generator=gen)
    labels_N = torch.randint(0, num_classes, (90,), generator=gen)
    classnames = [str(c) for c in range(num_classes)]
    templates = ["{c} 100", "101 {c}", "{c} 102"]
    batches = [(idx, labels_N[idx]) for idx in torch.arange(90).split(32)]
    model = _FakeClip(image_table_ND, encoder)
    theirs = cb_classification.evaluate(
        model, _Loader(batches, classnames), word_tokenizer, classnames, templates, "cpu", amp=False
    )
    w_DC = build_classifier(encoder, word_tokenizer, classnames, templates)
    theirs_w_DC = cb_classification.zero_shot_classifier(model, word_tokenizer, classnames, templates, "cpu", amp=False)
    torch.testing.assert_close(w_DC, theirs_w_DC)
    ours = zeroshot_classify(F.normalize(image_table_ND, dim=-1), w_DC, labels_N)
    assert ours["acc1"] == pytest.approx(theirs["acc1"], rel=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], rel=1e-12)
    if num_classes < 5:
        assert math.isnan(ours["acc5"]) and math.isnan(theirs["acc5"])
    else:
        assert ours["acc5"] == pytest.approx(theirs["acc5"], rel=1e-12)


@pytest.mark.parametrize("block_size", [1, 8, 1000])
def test_recall_matches_clip_benchmark_recall_at_k(block_size):
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    img_ND, txt_MD, t2i_M = random_multi_caption(40, 120, dim=8, seed=9)
    scores_MN = txt_MD @ img_ND.T
    positive_MN = torch.zeros_like(scores_MN, dtype=torch.bool)
    positive_MN[torch.arange(len(t2i_M)), t2i_M] = True
    ks = (1, 5, 10)
    got = retrieval_metrics(img_ND, txt_MD, t2i_M, ks=ks, block_size=block_size)
    for k in ks:
        img_hit_M = zr.batchify(zr.recall_at_k, scores_MN, positive_MN, 16, "cpu", k=k) > 0
        txt_hit_N = zr.batchify(zr.recall_at_k, scores_MN.T, positive_MN.T, 16, "cpu", k=k) > 0
        # theirs is a float32 mean, ours a float64 one
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(img_hit_M.float().mean().item(), abs=1e-6)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(txt_hit_N.float().mean().item(), abs=1e-6)


def test_retrieval_matches_clip_benchmark_evaluate():
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    gen = torch.Generator().manual_seed(10)
    encoder = BagOfWordsEncoder(vocab=100, dim=12, seed=11)
    image_table_ND = torch.randn(30, 12, generator=gen)
    # 1, 2 or 3 captions per image, all distinct words so no two texts tie
    words = [str(t) for t in torch.randperm(100, generator=gen).tolist()]
    sizes = [1, 2, 3] * 10
    captions = [words[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(30)]
    batches = [(idx, [captions[i] for i in idx.tolist()]) for idx in torch.arange(30).split(8)]
    theirs = zr.evaluate(
        _FakeClip(image_table_ND, encoder),
        batches,
        word_tokenizer,
        "cpu",
        amp=False,
        recall_k_list=[1, 5, 10],
    )
    texts = [c for caps in captions for c in caps]
    t2i_M = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    txt_MD = F.normalize(encoder(word_tokenizer(texts)), dim=-1)
    ours = retrieval_metrics(F.normalize(image_table_ND, dim=-1), txt_MD, t2i_M, ks=(1, 5, 10))
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
