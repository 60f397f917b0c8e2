"""Training tasks: the one run lifecycle (lifecycle.py), the stage contract and what the tasks share (stages.py),
each task's stages (sft.py, classification.py, preference.py; config/tasks.py says which is which), and the doctor's
checks before weights load.

May import: config, runs, models, data, eval.
"""
