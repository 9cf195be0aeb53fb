"""``kiln serve``'s settings, each declared once: the flag, its ``--help`` text and its range come from here."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from kiln.config import check_declared, setting

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSettings:
    """How ``kiln serve`` listens, batches and limits requests (not part of a run's config)."""

    host: str = setting("127.0.0.1", "Address to listen on; 0.0.0.0 serves every network this machine is on.",
                        flag="--host")
    port: int = setting(8000, "TCP port (0: any free port; the start-up line says which).", flag="--port",
                        minimum=0, maximum=65535)
    max_batch_tokens: int = setting(
        0, "Token budget of one micro-batch of concurrent requests, padding included (0: the run's, twice "
        "train.batch_tokens, as predict).", flag="--max-batch-tokens", minimum=0)
    max_wait_ms: float = setting(5.0, "Longest a request waits for others to share its batch, in ms (0: off, "
                                      "each request alone).", flag="--max-wait-ms", minimum=0, maximum=10_000)
    max_body_bytes: int = setting(1_000_000, "Largest request body; a larger one is refused (413).",
                                  flag="--max-body-bytes", minimum=1)
    max_inputs: int = setting(64, "Most inputs in one request; more are refused (422).", flag="--max-inputs",
                              minimum=1)
    api_key: str = setting("", "Require 'Authorization: Bearer KEY' on /predict, /info and /metrics (empty: "
                               "$KILN_API_KEY, else open).", flag="--api-key")
    max_new_tokens: int = setting(256, "Generation: the most new tokens a request may ask for (422 above).",
                                  flag="--max-new-tokens", minimum=1)
    max_beams: int = setting(4, "Generation: the most beams a request may ask for (422 above).", flag="--max-beams",
                             minimum=1)
    max_queue: int = setting(256, "Most requests waiting for the model; one more is refused with 429 and "
                                  "Retry-After.", flag="--max-queue", minimum=1)
    timeout_s: float = setting(60.0, "A request that waits and runs longer than this is answered 503 with "
                                     "Retry-After (its batch still completes for the others).", flag="--timeout",
                               above=0)
    max_connections: int = setting(512, "Open connections at most; more are answered 503 at once, so slow "
                                        "clients cannot take every socket.", flag="--max-connections", minimum=1)
    read_timeout_s: float = setting(10.0, "Seconds a client has to send a request's head (from connecting, or "
                                          "from the previous answer) and, again, its body; a slower one is "
                                          "closed (408 for a late body).", flag="--read-timeout", above=0,
                                    maximum=3600)

    def check(self) -> None:
        """Raise a KilnError naming the first value outside its declared type or range."""
        hints = typing.get_type_hints(ServeSettings)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = hints[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or isinstance(value, bool):
                from kiln.errors import KilnError

                raise KilnError(f"{f.metadata['flag']} expects {kind.__name__}, got {value!r}")
            check_declared(f.metadata["flag"], value, f)

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect."""
        return self.host in LOOPBACK or self.host.startswith("127.")


def setting_fields() -> list[tuple[dataclasses.Field, type]]:
    """Each serve setting's field and declared type, in declaration order (for the flags)."""
    hints = typing.get_type_hints(ServeSettings)
    return [(f, hints[f.name]) for f in dataclasses.fields(ServeSettings)]
