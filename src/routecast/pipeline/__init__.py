"""Running stages: the stage wrapper, the workspace claim, processes, atomic artifact writes, the code graph."""
