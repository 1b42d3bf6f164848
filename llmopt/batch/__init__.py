"""``llmopt run``: the competition's batch format. Test cases (or a flat list of questions) in,
per-case results with their measured ``duration`` (ms) out; resumable. Schema: ``llmopt.batch.cases``
and docs/batch.md."""

from llmopt.batch.cases import Batch, BatchFormatError, Case, Question, load_batch
from llmopt.batch.runner import BatchRun, CaseResult, RunOptions, RunSummary

__all__ = ["Batch", "BatchFormatError", "BatchRun", "Case", "CaseResult", "Question", "RunOptions", "RunSummary",
           "load_batch"]
