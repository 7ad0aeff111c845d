"""YAML presets shipped with robustcl (`robustcl configs` lists them)."""
