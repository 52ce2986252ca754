"""silofed.privacy: everything that decides what may leave a business unit's silo.

Pure functions and small stateful objects, free of any Flower import: consent evaluation, column
policies and minimisation, the silo schema that declares types, domains and bounds, and the
differential-privacy accounting that turns DP-SGD events into an (epsilon, delta) statement.
"""
