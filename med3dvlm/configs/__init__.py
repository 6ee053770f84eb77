"""Hydra config groups of med3dvlm (a package, so that Hydra finds them in an installed wheel)."""
