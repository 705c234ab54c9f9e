"""winogavil: WinoGAViL as DataComp scores it (:mod:`vlp.eval.winogavil`: the data, the prompt, the
Jaccard metrics). Each distinct candidate image is encoded once; an example is scored from the cosine
similarities of its candidates to its prompt. ``vlp eval --task winogavil --data DATA`` reads DataComp's
data folder (or a ``datasets`` cache under it); ``--dataset wds/misc/winogavil`` and the datacomp
suite find it under ``--dataset_root`` (:mod:`vlp.eval.benchmark_wds`).

Legend: N distinct images, E scored examples, K candidates of an example, D feature dim.
"""

from __future__ import annotations

import torch.nn.functional as F

from vlp.eval.datasets import EvalData, EvalDataError
from vlp.eval.extract import text_features
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register
from vlp.eval.winogavil import WinogavilData, clip_prompt, load_winogavil, winogavil_metrics


def run_winogavil(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """DataComp's ``avg_jaccard_score``, ``jaccard_score_{5,6,10,12,5-6,10-12}`` and ``num_samples``
    (the examples scored). An example with an image that cannot be decoded is left out (the image is
    counted in ``skipped``)."""
    if not isinstance(data, WinogavilData):
        raise EvalDataError(f"{data.name}: winogavil scores data read by its own loader (load_winogavil)")
    feats_ND, kept = encode_images(model, data, ctx)
    read = set(kept)
    examples = [e for e, images in enumerate(data.candidates) if read.issuperset(images)]
    if not examples:
        return winogavil_metrics([], [])
    prompts = [clip_prompt(data.cues[e]) for e in examples]
    texts_ED = F.normalize(text_features(model, tokenizer, prompts, ctx.env, batch_size=ctx.batch_size), dim=-1)
    images_ND = F.normalize(feats_ND, dim=-1)
    scores = [(images_ND[data.candidates[e]] @ texts_ED[k]).numpy() for k, e in enumerate(examples)]
    return winogavil_metrics(scores, [data.associated[e] for e in examples])


TASK = register(
    EvalTask(
        "winogavil",
        load=load_winogavil,
        run=run_winogavil,
        note="DataComp's data folder: its hf_cache/ of nlphuji/winogavil",
    )
)
