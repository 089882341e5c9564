"""schemas: the fleet's typed boundaries, msgspec Structs that import nothing of the project.

`messages`: every message on the bus; `missions`: mission specs (the TOML files in `missions/`),
their validation and their expansion into tasks.
"""
