"""Key escaping and OData literals for the Azure backend (defined in ``storage._keys``, which the
in-memory backend shares so that both list instances in the same order)."""

from storage._keys import (
    escape_key,
    odata_datetime,
    odata_int,
    odata_string,
    prefix_upper_bound,
    unescape_key,
    validate_task_hub_name,
)

__all__ = [
    "escape_key",
    "odata_datetime",
    "odata_int",
    "odata_string",
    "prefix_upper_bound",
    "unescape_key",
    "validate_task_hub_name",
]
