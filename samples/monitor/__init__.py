"""The monitor sample: its orchestrators and activities live in ``blueprint``."""
