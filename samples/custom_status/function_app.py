"""Custom status sample app: the standard HTTP starter plus the orchestrator and activities of
``blueprint.py``. Run it with ``durable start -d samples/custom_status``."""

import azure.functions as func
from blueprint import bp

import durable as df

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(df.http_starter())  # POST /api/orchestrators/{functionName}
app.register_functions(bp)
