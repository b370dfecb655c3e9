"""MME score (acc, acc+, score per subtask; perception, cognition, total) as a local `evaluate` module.

A thin wrapper over `components.evaluation.metrics.mme.score_mme`, which reproduces the official MME tool's
arithmetic; see that module for the rules.
"""

import datasets
import evaluate

from components.evaluation.metrics.mme import score_mme

_DESCRIPTION = """
MME scoring as the official tool does it: a prediction is read as yes/no/other from its first four
lower-cased characters; acc = % of questions right, acc+ = % of images with both questions right,
score = acc + acc+ (max 200); perception and cognition are the sums over their subtasks present.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): "Yes" or "No" (any case).
    subtasks (list of str): MME subtask of each question (existence, ..., OCR,
        commonsense_reasoning, numerical_calculation, text_translation, code_reasoning).
    images (list of str): image of each question; every image must have exactly two questions.
Returns:
    subtasks (dict): per subtask acc, acc_plus, score (percent), questions, images, other.
    perception, cognition, total (float).
"""

_CITATION = """
@article{fu2023mme,
  title={MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models},
  author={Fu, Chaoyou and others},
  journal={arXiv preprint arXiv:2306.13394},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MmeScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "subtasks": datasets.Value("string"),
                    "images": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, subtasks, images):
        return score_mme(predictions, references, subtasks, images)
