"""The `align` stage: the base every method starts from (the shipped staged base, a rebuild, or the joint recipe)."""
