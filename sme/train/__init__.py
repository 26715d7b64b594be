"""Training: pure steps (step.py), state (state.py) and the driver loop (loop.py)."""
