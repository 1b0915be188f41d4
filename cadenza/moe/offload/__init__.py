"""Where a routed expert that is not resident on the GPU is computed, and the machinery that carries it out.

policy.py holds the decision (pure functions of measured costs and `OffloadOptions`); orchestra.py the shared state;
layer.py, eager.py and streamed.py the executors; planning.py and calibration.py what happens once at load.
"""
