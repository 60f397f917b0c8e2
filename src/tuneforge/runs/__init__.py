"""The run directory and everything written into it: claiming it (rundir.py), the manifest, checkpoints and what
resumes, the guards around training (faults.py), multi-process launch, secret redaction, the console, plots, the
model card, and the objective a sweep optimizes.

May import: config.
"""
