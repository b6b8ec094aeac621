"""The sub orchestrations sample: its orchestrators and activities live in ``blueprint``."""
