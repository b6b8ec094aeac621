"""The dashboard: a web UI over a task hub (instances, history timeline, entities, actions),
served by ``durable start`` under ``/dashboard`` and by ``durable dashboard`` on its own."""

from ._server import DASHBOARD_PATH, Authorize, dashboard_app, mount_dashboard
from ._standalone import serve_dashboard, standalone_client

__all__ = ["DASHBOARD_PATH", "Authorize", "dashboard_app", "mount_dashboard", "serve_dashboard", "standalone_client"]
