"""Support: value checks, atomic file writes, provenance, cache folders, the XLA:CPU flags, JAX's
compilation cache, what the host computer offers (cores, pinning, CPU name) on any platform. Imports nothing else of bnjax.
"""
