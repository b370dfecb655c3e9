"""Multiple-choice accuracy by option letter, as a local `evaluate` metric module.

A thin wrapper over `components.evaluation.metrics.text.letter_match`: "B", "(b)", "B) square", "option B"
and, when the options text is passed, "square" all count as B.
"""

import datasets
import evaluate

from components.evaluation.metrics.text import letter_match, option_letter

_DESCRIPTION = """
Share of predictions that name the same option letter as their reference. The reference goes
through the same extraction; a reference that names no option raises ValueError (wrong metric for
the task, not a miss).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers ("B", "(B) square", or an option's text).
    options (list of str or None, optional, keyword): per item, the options text from the
        instruction, e.g. "(A) circle (B) square"; lets answers that spell out an option count.
        Passed to compute() only (not stored by add_batch).
Returns:
    letter_match (float): mean of per-item matches, in [0, 1].
    unparsed (float): share of predictions that name no option at all.
Examples:
    >>> m = load_metric("vf_option_letter")
    >>> m.compute(predictions=["(b)", "square"], references=["B", "B"], options=["(A) circle (B) square"] * 2)
    {'letter_match': 1.0, 'unparsed': 0.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VfOptionLetter(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, options=None):
        if not predictions:
            raise ValueError("vf_option_letter: no predictions to score")
        if options is None:
            options = [None] * len(predictions)
        elif len(options) != len(predictions):
            raise ValueError(f"vf_option_letter: {len(options)} options for {len(predictions)} predictions")
        hits = [letter_match(p, r, o) for p, r, o in zip(predictions, references, options)]
        unparsed = [option_letter(p, o) is None for p, o in zip(predictions, options)]
        return {"letter_match": sum(hits) / len(hits), "unparsed": sum(unparsed) / len(unparsed)}
