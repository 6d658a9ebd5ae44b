"""A request's text: its new token ids detokenised step by step, and its stop strings.

The control plane and the step scheduler deal in token ids; this output side turns each step's
ids into the text a client may see now (never a partial character or the start of a stop string)
and ends a sequence whose text reached one of its stop strings, as vLLM's output processor does.
"""

from __future__ import annotations

from collections.abc import Callable

from faasmoe.control.sequence import Sequence


class TextOutput:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.text = ""  # the text so far, cut before a stop string
        self.emitted = 0  # characters of `text` already handed out

    def update(self, seq: Sequence) -> str:
        """After a step that added tokens to `seq`: the text that is safe to hand out now. Ends `seq` if its
        text reached a stop string."""
        text = self.decode(seq.output_ids)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
                seq.stop_at_text()
        self.text = text
        return self.new_text(seq.finished)

    def new_text(self, finished: bool) -> str:
        """Text not yet handed out; while the sequence runs, minus a partial character (the next token
        completes it) and minus a tail that may be the start of a stop string."""
        safe = len(self.text)
        if not finished:
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence the next token will finish
                safe -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        delta = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta
