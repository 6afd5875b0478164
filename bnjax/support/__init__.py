"""Support: value checks, atomic file writes, provenance, cache folders, the XLA:CPU flags, JAX's
compilation cache. Imports nothing else of bnjax.
"""
