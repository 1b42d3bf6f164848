"""Engine outputs -> OpenAI response bodies (whole) and stream chunks, for one request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llmopt.engine.sequence import RequestOutput, TokenLogprob
from llmopt.serve import protocol as P
from llmopt.serve.reasoning import split_reasoning


@dataclass
class _Choice:
    out: RequestOutput | None = None
    sent_text: str = ""
    sent_reasoning: str = ""
    sent_tokens: int = 0
    text_offset: int = 0


class Formatter:
    """RequestOutputs -> OpenAI responses (whole) or chunks (streaming) for one request."""

    def __init__(self, server: Any, req: Any, rid: str, n: int, n_prompt: int, chat: bool,
                 prefixes: list[str] | None, in_think: bool):
        self.s, self.req, self.rid, self.n_prompt, self.chat = server, req, rid, n_prompt, chat
        self.model = req.model
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(n)]
        self.prefixes = prefixes or [""] * n
        for c, p in zip(self.choices, self.prefixes):
            c.text_offset = len(p)
        self.reasoning = chat and server.cfg.reasoning_parser == "think"
        self.in_think = in_think

    def add(self, index: int, out: RequestOutput) -> None:
        self.choices[index].out = out

    # -- logprobs --
    def _lp_completion(self, c: _Choice, lps: list[TokenLogprob]) -> P.CompletionLogprobs:
        res = P.CompletionLogprobs()
        for lp in lps:
            tok = self.s.token_str(lp.token_id)
            res.tokens.append(tok)
            res.token_logprobs.append(lp.logprob)
            top = {self.s.token_str(t): v for t, v in lp.top}
            top.setdefault(tok, lp.logprob)
            res.top_logprobs.append(top)
            res.text_offset.append(c.text_offset)
            c.text_offset += len(tok)
        return res

    def _lp_chat(self, lps: list[TokenLogprob]) -> P.ChatChoiceLogprobs:
        def entry(tid: int, v: float) -> dict[str, Any]:
            t = self.s.token_str(tid)
            return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

        return P.ChatChoiceLogprobs(content=[P.ChatCompletionTokenLogprob(
            **entry(lp.token_id, lp.logprob), top_logprobs=[P.TopLogprob(**entry(t, v)) for t, v in lp.top])
            for lp in lps])

    def _usage(self) -> P.UsageInfo:
        done = sum(len(c.out.token_ids) for c in self.choices if c.out is not None)
        return P.UsageInfo(prompt_tokens=self.n_prompt, completion_tokens=done, total_tokens=self.n_prompt + done)

    # -- whole response --
    def final(self) -> dict[str, Any]:
        if not self.chat:
            choices = []
            for i, c in enumerate(self.choices):
                o = c.out
                lp = self._lp_completion(c, o.logprobs) if o.logprobs is not None else None
                choices.append(P.CompletionChoice(index=i, text=self.prefixes[i] + o.text, logprobs=lp,
                                                  finish_reason=o.finish_reason))
            return P.CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=choices,
                                        usage=self._usage()).model_dump(exclude_none=False)
        choices = []
        for i, c in enumerate(self.choices):
            o = c.out
            reasoning, content = (split_reasoning(o.text, self.in_think) if self.reasoning else (None, o.text))
            msg = P.ChatMessageOut(content=content, reasoning_content=reasoning)
            lp = self._lp_chat(o.logprobs) if o.logprobs is not None else None
            choices.append(P.ChatCompletionChoice(index=i, message=msg, logprobs=lp, finish_reason=o.finish_reason))
        return P.ChatCompletionResponse(id=self.rid, created=self.created, model=self.model, choices=choices,
                                        usage=self._usage()).model_dump()

    # -- streaming --
    def _chunk(self, choices: list, usage: P.UsageInfo | None = None) -> dict[str, Any]:
        so = self.req.stream_options
        if usage is None and choices and so is not None and so.continuous_usage_stats:
            usage = self._usage()
        cls = P.ChatCompletionStreamResponse if self.chat else P.CompletionStreamResponse
        return cls(id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage).model_dump()

    def start_chunks(self) -> list[dict[str, Any]]:
        if self.chat:
            return [self._chunk([P.ChatCompletionStreamChoice(index=i, delta=P.DeltaMessage(role="assistant",
                                                                                             content=""))])
                    for i in range(len(self.choices))]
        return [self._chunk([P.CompletionChoice(index=i, text=p)]) for i, p in enumerate(self.prefixes) if p]

    def chunks(self, index: int, out: RequestOutput) -> list[dict[str, Any]]:
        c = self.choices[index]
        c.out = out
        text = out.text[:out.released_chars]  # the engine holds back a tail that may become a stop string
        new_lps = out.logprobs[c.sent_tokens:] if out.logprobs is not None else None
        c.sent_tokens = len(out.token_ids)
        finish = out.finish_reason if out.finished else None
        if not self.chat:
            delta = text[len(c.sent_text):]
            c.sent_text = text if len(text) > len(c.sent_text) else c.sent_text
            if not delta and not new_lps and not finish:
                return []
            lp = self._lp_completion(c, new_lps) if new_lps is not None else None
            return [self._chunk([P.CompletionChoice(index=index, text=delta, logprobs=lp, finish_reason=finish)])]
        if self.reasoning:
            reasoning, content = split_reasoning(text, self.in_think, final=out.finished)
        else:
            reasoning, content = None, text
        d_reason = (reasoning or "")[len(c.sent_reasoning):]
        d_content = content[len(c.sent_text):]
        c.sent_reasoning = max(c.sent_reasoning, reasoning or "", key=len)
        c.sent_text = max(c.sent_text, content, key=len)
        if not d_reason and not d_content and not new_lps and not finish:
            return []
        delta = P.DeltaMessage(content=d_content or None, reasoning_content=d_reason or None)
        lp = self._lp_chat(new_lps) if new_lps else None
        choice = P.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)
        return [self._chunk([choice])]

    def usage_chunk(self) -> dict[str, Any] | None:
        so = self.req.stream_options
        if so is None or not so.include_usage:
            return None
        return self._chunk([], usage=self._usage())
