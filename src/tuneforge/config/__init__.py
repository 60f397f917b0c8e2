"""What a run may say, checked before anything loads: the config schemas (schemas.py) and the keys derived from
the libraries (library_keys.py), the task table (tasks.py), the format and packing-mode records (formats.py,
packing_modes.py), validation, Hydra composition, the mapping to the libraries' config objects (library_args.py),
the device and precision decisions (device.py), paths, strict loading of user code (user_code.py), errors.

The bottom layer: imports no other tuneforge package, and loads no library on import (the derived schemas are
read from their cache, or derived, on first use).
"""
