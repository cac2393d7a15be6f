"""What a run says aloud: a checkpoint resumed or set aside, layers left dense, a budget capped,
a method run without the data it is made for.

Said through the ``vqcompress`` logger at WARNING, which Python prints on stderr unless the
application configures logging (``logging.getLogger("vqcompress").setLevel(logging.ERROR)``
silences it); the ``vqc`` command prints it beside its progress bars.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vqcompress")


def say(message: str) -> None:
    logger.warning(message)
