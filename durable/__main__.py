"""``python -m durable`` is the ``durable`` command."""

from .host._cli import main

main()
