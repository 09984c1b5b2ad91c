"""The params schema (typed dataclasses), and reading and writing `params.yaml`."""
