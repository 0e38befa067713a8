"""Model definitions as pure functions over weight pytrees."""
