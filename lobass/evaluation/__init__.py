"""Evaluation: GSM8K and IFEval through lm-eval, generation, pairwise judging, held-out loss.

Modules: ``harness`` (lm-eval model and task manager), ``gsm8k``, ``ifeval``, ``prompts`` (prompt
sets and reference answers), ``generation`` (batched greedy answers, resumable JSONL), ``judge``
(pairwise comparison against a baseline run), ``heldout`` (reference-free loss), ``stats``
(intervals).
"""

from lobass.evaluation.gsm8k import evaluate_gsm8k, gsm8k_task_config
from lobass.evaluation.heldout import heldout_loss_metrics

__all__ = ["evaluate_gsm8k", "gsm8k_task_config", "heldout_loss_metrics"]
