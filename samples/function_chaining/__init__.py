"""The function chaining sample: its orchestrators and activities live in ``blueprint``."""
