"""The offloading-engine simulation: hardware presets, the cache and link, the replay."""
