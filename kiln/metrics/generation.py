"""Generation metrics from the reference packages: sacreBLEU (BLEU, chrF) and rouge-score."""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacreBLEU defaults), mean ROUGE-1/2/L/Lsum F-measure and exact match,
    all on a 0-100 scale as the packages report them.

    ROUGE is scored as ``run_summarization`` does (Porter stemming; ``rougeLsum`` over
    newline-separated sentences). rouge-score's tokenizer keeps only ``[a-z0-9]``, so ROUGE means
    little for other scripts: use chrF there.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions, references = list(predictions), list(references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    rouge = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for key, score in scorer.score(reference, prediction).items():
            rouge[key] += score.fmeasure
    n = max(len(predictions), 1)
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        **{key: 100.0 * value / n for key, value in rouge.items()},
        "exact_match": 100.0 * sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n,
    }
