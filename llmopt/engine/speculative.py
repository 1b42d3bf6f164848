"""Speculative decoding by n-gram lookup ("prompt lookup decoding"): draft tokens from the sequence's
own text, verified by the model in the same step.

A greedy sequence whose last ``n`` tokens (``prompt_lookup_max`` down to ``prompt_lookup_min``)
occurred before, in its prompt or its output, proposes the tokens that followed the most recent
earlier occurrence. The engine computes the sequence's last token and the drafts as one chunk of
consecutive rows (the fused decode step's chained rows: each row the same bits as that token decoded
alone), takes the greedy token of every row, keeps the drafts up to the first one that differs from
the model's choice and adds the model's token after them. So the output is token for token the
output without speculation; what changes is how many tokens one step yields. Rejected drafts leave
K/V rows past the sequence's computed length, which the next step overwrites.

Who speculates: greedy requests without a grammar, logprobs, KV compression or an early-exit probe
of their own (a probe itself does not draft), while at most ``spec_max_batch`` sequences run (next to other sequences' rows a draft row costs about
a decode row's time, more than it saves).
How much: at most ``num_speculative_tokens`` per sequence and ``spec_max_rows`` rows a step, handed
out likeliest first (the longer the matched n-gram, the likelier the draft is kept: a 2-4 token match
kept its first draft in 53-62% of the positions on the reasoning model's outputs, a 1-token match in
28%; the engine keeps counting) while they pay for their rows (:func:`allot`, :func:`step_cost`).

Reading: vLLM's ``NgramProposer`` (prompt_lookup_max / _min) and llama.cpp's lookup decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NgramIndex:
    """Where each n-gram of a token list last ended, for ``n`` in ``[n_min, n_max]``, updated
    incrementally (O(n_max) per new token). ``follow[n][gram]`` = the index of the token that followed
    the gram's most recent occurrence whose follower is known."""

    n_min: int
    n_max: int
    follow: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    indexed: int = 0  # follower positions 1..indexed-1 are in the index

    def update(self, tokens: list[int]) -> None:
        """Index every gram whose follower is now known (followers at positions < len(tokens))."""
        for e in range(max(1, self.indexed), len(tokens)):
            for n in range(self.n_min, self.n_max + 1):
                if e >= n:
                    self.follow.setdefault(n, {})[tuple(tokens[e - n:e])] = e
        self.indexed = max(self.indexed, len(tokens))

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """Up to ``k`` draft tokens continuing ``tokens`` and the length of the matched n-gram (0 and
        no drafts when no suffix of length >= n_min occurred before)."""
        self.update(tokens)
        t = len(tokens)
        for n in range(min(self.n_max, t - 1), self.n_min - 1, -1):
            e = self.follow.get(n, {}).get(tuple(tokens[t - n:]))
            if e is not None:
                return tokens[e:e + k], n
        return [], 0


class AcceptanceStats:
    """How often a draft at depth j (1 = first) after an n-gram match of length n was kept, given the
    drafts before it were: counts start from a prior (``PRIOR_TRIES`` tries at the rates measured on the
    reasoning model's outputs) and then follow what this engine sees."""

    PRIOR_TRIES = 8

    def __init__(self, n_max: int, k_max: int):
        self.tried = [[0.0] * (k_max + 1) for _ in range(n_max + 1)]
        self.kept = [[0.0] * (k_max + 1) for _ in range(n_max + 1)]
        for n in range(1, n_max + 1):
            for j in range(1, k_max + 1):
                rate = 0.3 if n == 1 and j == 1 else 0.5 if n == 1 else 0.6
                self.tried[n][j], self.kept[n][j] = self.PRIOR_TRIES, self.PRIOR_TRIES * rate

    def chances(self, n: int, k: int) -> list[float]:
        """P(drafts 1..j all kept) for j = 1..k after a match of length n."""
        out, p = [], 1.0
        for j in range(1, k + 1):
            p *= self.kept[n][j] / self.tried[n][j]
            out.append(p)
        return out

    def record(self, n: int, drafts: int, kept: int, mismatched: bool) -> None:
        """A verified chunk: ``kept`` of its ``drafts`` kept; ``mismatched``: the next one was checked and
        differed (False: the sequence stopped for another reason, the rest were not judged)."""
        for j in range(1, min(drafts, kept + mismatched) + 1):
            self.tried[n][j] += 1
            self.kept[n][j] += j <= kept


def step_cost(rows: int, row_cost: float, tile_cost: float, tile_rows: int) -> float:
    """A decode step's time for ``rows`` rows, in units of its fixed part (weights read, per-step work):
    ``1 + row_cost * rows + tile_cost * ceil(rows / tile_rows)``: the kernels run rows in register tiles
    of ``tile_rows`` (4 on the GGUF and packed fp32 paths), and a tile costs about the same however
    many of its rows are used."""
    return 1.0 + row_cost * rows + tile_cost * -(-rows // tile_rows)


def allot(chances: list[list[float]], rows: int, base_rows: int, row_cost: float, tile_cost: float = 0.0,
          tile_rows: int = 4) -> list[int]:
    """How many drafts each candidate gets. ``chances[i]`` = candidate i's P(first j drafts kept),
    nonincreasing in j; ``rows`` = the step's row cap; ``base_rows`` = rows without drafts; the step's
    time follows :func:`step_cost`. Drafts are taken likeliest first, a register tile at a time: the
    rows still free in the last tile one by one, each new tile with its (up to ``tile_rows``) likeliest
    drafts, as long as the expected tokens they add at least keep the step's tokens per unit of time
    (a group of chance sum P joins when P >= tokens * (cost with it - cost without) / cost without,
    tokens = rows expected to be kept so far, the decode rows included)."""
    items = sorted(((p, j, i) for i, ps in enumerate(chances) for j, p in enumerate(ps)), key=lambda x: (-x[0], x[1]))
    out = [0] * len(chances)
    used, tokens, k = base_rows, float(base_rows), 0
    while k < len(items) and used < rows:
        cost = step_cost(used, row_cost, tile_cost, tile_rows)
        group = items[k:k + 1]
        if used % tile_rows == 0:  # a new tile: grow the group while each next draft pays for its row
            room = min(tile_rows, rows - used)
            while len(group) < room and k + len(group) < len(items):
                gain = sum(p for p, _, _ in group)
                c = step_cost(used + len(group), row_cost, tile_cost, tile_rows)
                if items[k + len(group)][0] < (tokens + gain) * row_cost / c:
                    break
                group = items[k:k + len(group) + 1]
        extra = step_cost(used + len(group), row_cost, tile_cost, tile_rows) - cost
        if sum(p for p, _, _ in group) < tokens * extra / cost:
            break
        for p, _, i in group:
            out[i] += 1  # sorted by chance, then depth: each candidate's drafts are taken in order
            tokens += p
        used += len(group)
        k += len(group)
    return out
