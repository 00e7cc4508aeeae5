"""Incremental detokenization with streaming-safe stop strings.

Text is released only when it can no longer become part of a stop string: a suffix of the text that is
a prefix of some stop string is held back until the next token decides it.
"""

from __future__ import annotations

from megatier.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.stream = tokenizer.decode_stream(skip_special_tokens) if tokenizer else None
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.text = ""  # everything decoded so far (cut at a stop string once one matched)
        self.emitted = 0  # how many characters of text were already released
        self.stop_reason: str | None = None
        self._stop_at = -1  # where the matched stop string starts in text

    def add(self, token_id: int, check_stop: bool = True) -> None:
        """Decode one more token; sets stop_reason (and cuts the text) if a stop string completed.
        `check_stop` is False while min_tokens is not reached."""
        if self.stream is None:
            return
        piece = self.stream.step(self.tokenizer.hf, token_id)
        if not piece:
            return
        scan_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        for s in self.stop if check_stop else ():
            at = self.text.find(s, scan_from)
            if at != -1 and (self.stop_reason is None or at < self._stop_at):
                self.stop_reason, self._stop_at = s, at
        if self.stop_reason is not None:
            self.text = self.text[: self._stop_at + (len(self.stop_reason) if self.include_stop else 0)]

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def release(self, final: bool) -> str:
        """The text that became safe to show since the last call (everything, when `final`)."""
        end = len(self.text) if final or self.stop_reason else len(self.text) - self._held_back()
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta
