"""What kind of model a folder holds, and its parts: per-task heads, the repeated layer
stack, encoder pools whose experts carry their own heads."""
