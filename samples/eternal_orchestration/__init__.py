"""The eternal orchestration sample: its orchestrators and activities live in ``blueprint``."""
