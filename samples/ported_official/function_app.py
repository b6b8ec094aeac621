"""A Durable Functions app written for the official Python SDK, ported by its import line: the
durable functions live in a ``df.Blueprint`` (``orders.py``) registered on a plain
``func.FunctionApp``, which is all it takes for the durable runtime to attach to this app."""

import azure.functions as func
from orders import bp

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(bp)
