"""captioning: beam-search captions of a CoCa model scored against reference captions
(:mod:`vlp.eval.captioning`; pycocoevalcap is imported only when the task runs)."""

from __future__ import annotations

from vlp.eval.captioning import evaluate_captioning
from vlp.eval.datasets import EvalData, PathSpec, load_retrieval
from vlp.eval.registry import EvalContext, EvalTask, register


def load_captioning(path: PathSpec) -> EvalData:
    """Reference captions per image: the :func:`~vlp.eval.datasets.load_retrieval` layouts, one row
    per image. JSONL ``{"image": path, "captions": [str, ...]}`` (or ``"caption": str``), images
    relative to the file's folder; or shards with ``txt`` or a json ``captions`` list. The same rows
    are skipped and counted and the same errors raised as for retrieval.
    """
    return load_retrieval(path)


def run_captioning(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """Beam-search captions (CoCa models only) scored with COCO's corpus BLEU-4 and CIDEr-D:
    ``bleu4``, ``cider``, ``num_images``, ``examples``. Raises GenerationError (not a CoCa model),
    MissingDependencyError (no pycocoevalcap), EvalDataError (no readable image)."""
    return evaluate_captioning(
        model,
        tokenizer,
        data,
        ctx.preprocess,
        ctx.env,
        batch_size=ctx.batch_size,
        workers=ctx.workers,
        policy=ctx.image_policy,
    )


TASK = register(
    EvalTask(
        "captioning",
        load=load_captioning,
        run=run_captioning,
        note="CoCa models; needs pycocoevalcap",
    )
)
