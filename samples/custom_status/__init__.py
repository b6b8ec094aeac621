"""The custom status sample: its orchestrators and activities live in ``blueprint``."""
