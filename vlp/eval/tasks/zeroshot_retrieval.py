"""zeroshot_retrieval (alias retrieval): find each caption's image and each image's captions.

Legend: N images, M texts, D feature dim.
"""

from __future__ import annotations

import torch

from vlp.eval.datasets import EvalData, load_retrieval
from vlp.eval.extract import text_features
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register
from vlp.eval.retrieval import retrieval_chance, retrieval_metrics


def run_zeroshot_retrieval(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """Recall@1/5/10 both ways (CLIP_benchmark definitions), mean ranks and the chance of each recall;
    the captions of an image that could not be read are left out with it."""
    feats_ND, kept = encode_images(model, data, ctx)
    keep = set(kept)
    texts = [i for i, image in enumerate(data.text_to_image) if image in keep]
    remap = {old: new for new, old in enumerate(kept)}
    text_MD = text_features(model, tokenizer, [data.captions[i] for i in texts], ctx.env, batch_size=ctx.batch_size)
    text_to_image_M = torch.as_tensor([remap[data.text_to_image[i]] for i in texts])
    out = retrieval_metrics(feats_ND[kept], text_MD, text_to_image_M)
    for k in (1, 5, 10):
        chance = retrieval_chance(len(kept), len(texts), k)
        out.update({f"chance_{key}": v for key, v in chance.items()})
    return out


TASK = register(EvalTask("zeroshot_retrieval", load=load_retrieval, run=run_zeroshot_retrieval, aliases=("retrieval",)))
