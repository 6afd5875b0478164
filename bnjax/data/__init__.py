"""Data: MNIST and Fashion-MNIST from their sources, verified and cached (datasets.py), and the
readers of each source (sources.py). Imports only bnjax.support.
"""
