"""The data stage: sources (hub, local files, built-in sets), mixing, formatting (the records of config/formats.py),
chat-template rendering, tokenization with loss masks, the content-addressed cache, packing and the collators.

May import: config, runs, models.
"""
