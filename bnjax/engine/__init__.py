"""The engine: many runs fast. Runs stacked into one program and several steps per dispatch
(loop.py), launched as a Strategy says (strategy.py) over devices, hosts or worker processes
(launch.py, workers.py). It computes what bnjax.train computes (the engine's tests hold it to that).
"""
