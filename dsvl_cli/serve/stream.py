"""`Deltas`: streamed text pieces -> chunks whose concatenation is exactly the final answer.

The session keeps the answer stripped and cut before the first stop string; pieces arrive before
either is known. So a chunk never holds trailing whitespace or a tail that could begin a stop
string; those wait for the next piece, and the end of the answer (`finish`) sends what is left.
"""

from __future__ import annotations

from dsvl_cli.log import get_logger

log = get_logger(__name__)


class Deltas:
    """Turns pieces into safe chunks (see the module docstring).

    Args:
        stop: the request's stop strings.
    """

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.seen = ""
        self.sent = ""

    def _safe(self) -> str:
        """The longest prefix of what was seen that the final answer surely starts with."""
        text = self.seen.lstrip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
        else:
            hold = max(
                (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
            text = text[: len(text) - hold]
        return text.rstrip()

    def add(self, piece: str) -> str:
        """Text to send now for `piece` (may be empty)."""
        self.seen += piece
        safe = self._safe()
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        chunk, self.sent = safe[len(self.sent) :], safe
        return chunk

    def finish(self, final: str) -> str:
        """What is left to send once the session's answer `final` is known."""
        if not final.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent, final)
            return ""
        rest, self.sent = final[len(self.sent) :], final
        return rest
