"""Exact match after answer normalisation, as a local `evaluate` metric module.

A thin wrapper: the rule lives in `components.evaluation.metrics.text.normalize_answer`, so the module and
the unit tests share one definition. Loaded by path (`components.evaluation.metrics.load_metric`), never
from the hub.
"""

import datasets
import evaluate

from components.evaluation.metrics.text import exact_match

_DESCRIPTION = """
Share of predictions equal to their reference after normalisation: lowercase, punctuation removed
(decimal points between digits kept, thousands commas dropped), articles a/an/the dropped, number
words zero..twenty turned into digits, whitespace collapsed.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers, one per prediction.
Returns:
    exact_match (float): mean of per-item matches, in [0, 1].
Examples:
    >>> m = load_metric("vf_exact_match")
    >>> m.compute(predictions=["Three cats."], references=["3 cats"])
    {'exact_match': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VfExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("vf_exact_match: no predictions to score")
        hits = [exact_match(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits)}
