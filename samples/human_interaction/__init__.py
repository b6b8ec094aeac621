"""The human interaction sample: its orchestrators and activities live in ``blueprint``."""
