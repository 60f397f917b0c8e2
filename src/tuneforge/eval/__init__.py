"""Generation and scores: THE inference helper every generation goes through (inference.py), the metrics and the
before/after table, two models compared (compare.py), samples during training.

May import: config, runs, models, data.
"""
