"""``python -m durable`` is the ``durable`` command."""

from ._cli import main

main()
