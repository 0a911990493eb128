"""Evaluation on any graph of a bundle: the model card's zero-shot tasks and perplexity. No torch.

    from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer
    scorer = open_scorer("cpm-bundle", "cpu-int8")
    task = load_task("tnews", "tnews_public")
    result = classify(scorer, encode_examples(task, scorer.tokenizer, scorer.n_positions))
"""

from .chid import load_chid
from .clue import TASKS, load_task
from .metrics import perplexity, perplexity_of_lines
from .scoring import Scorer, open_scorer
from .tasks import EvalDataError, Example, Task, classify, encode_examples, shard, summarize

__all__ = ["EvalDataError", "Example", "Scorer", "TASKS", "Task", "classify", "encode_examples", "load_chid",
           "load_task", "open_scorer", "perplexity", "perplexity_of_lines", "shard", "summarize"]
