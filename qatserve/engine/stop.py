"""Stop strings that may span token boundaries: emit text only once it cannot start a stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False
        self.hit: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> str:
        """Feed newly decoded text; return what can be shown now (text before a stop string is kept)."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            at, self.hit = min(hits, key=lambda h: h[0])
            out, self.pending = self.pending[:at], ""
            return out
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
