"""Token ids to text, one way everywhere output text is made (server, CLI, eval, speculate)."""


def complete_text(text: str) -> str:
    """`text` without the replacement characters a decode leaves for an incomplete trailing UTF-8 sequence
    (tokens cut inside a multi-byte character): what is final so far."""
    return text.rstrip("\ufffd")


def decode_text(tokenizer, ids: list[int]) -> str:
    """The text of generated tokens, as everywhere output text is made (server, CLI, eval, speculate): special
    tokens skipped, and a character cut by the token limit left out rather than written as U+FFFD. The same
    string `TextStream` streams piece by piece."""
    return complete_text(tokenizer.decode(list(ids), skip_special_tokens=True))


class TextStream:
    """Token ids in, printable text deltas out (an incremental detokenizer). Holds back trailing bytes of an
    incomplete UTF-8 character and any tail that could still grow into a stop string; a stop string ends the
    text just before it. At the end (`flush`) an incomplete character is dropped, so the streamed pieces
    always join to `text`, which is `decode_text` of the tokens (up to a stop string)."""

    def __init__(self, tokenizer, stop_token_ids: list[int], stop: list[str] = ()):
        self.tok, self.stop_ids, self.stop = tokenizer, set(stop_token_ids), [s for s in stop if s]
        self.ids: list[int] = []  # new tokens, stop token included
        self.text, self.emitted = "", 0
        self.stop_hit = False  # a stop token or stop string ended the text

    def push(self, ids: list[int]) -> str:
        for i in ids:
            if self.stop_hit:
                break
            self.ids.append(int(i))
            self.stop_hit = int(i) in self.stop_ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.text, self.stop_hit = complete_text(text[: min(cuts)]), True
            return self._emit(len(self.text))
        self.text = text
        safe = len(complete_text(text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        return self._emit(safe - hold)

    def flush(self) -> str:
        """The rest of the text, an incomplete trailing character dropped; `text` is then what was emitted."""
        self.text = complete_text(self.text)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted += len(delta)
        return delta
