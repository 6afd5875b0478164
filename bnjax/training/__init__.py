"""Training one run: the config (config.py), state and steps (steps.py), which examples each step
sees (schedule.py), evaluation with running, precise or batch statistics (evaluation.py,
precise_bn.py), the History (history.py), checkpoints, and the plain loop that defines what
training computes (train.py). Imports bnjax.nets, bnjax.bn, bnjax.data, bnjax.support.
"""
