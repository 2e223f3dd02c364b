"""Stop strings over streamed text, for engines that see the text as it is generated (mlx,
llamacpp, mistral) rather than leaving stops to their library."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopText:
    """Stop strings over streamed text pieces: emits only text that cannot be the start of a
    stop string, and stops at the first complete one (which is not emitted), as vLLM and the
    OpenAI API do."""

    stops: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what may be shown now."""
        if self.stopped:
            return ""
        self.text += piece
        # Text already sent holds no stop string's start: the longest partial match was held back.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops if s) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text))
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        """The held-back tail once generation ended without a stop string."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out
