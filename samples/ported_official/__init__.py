"""The ported sample: a blueprint of durable functions (``orders``) on a plain ``func.FunctionApp``."""
