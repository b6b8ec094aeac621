"""Runnable samples. Each folder is a complete app (``durable start -d samples/<name>``) whose
orchestrators and activities live on a ``Blueprint`` in its ``blueprint.py``, which the root
``function_app.py`` also registers."""
