"""``python -m vqcompress`` is the ``vqc`` command."""

from .cli import main

main()
