"""The fan out fan in sample: its orchestrators and activities live in ``blueprint``."""
