"""Conformance: generated programs run on the real runtime under injected faults, compared with a
reference model of the high-level semantics (``model``, ``programs``, ``simulate``, ``run``)."""
