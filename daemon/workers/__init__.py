"""The child processes: the cycle worker and its supervisor, their typed events, the background
engine rebuild, and what every child does first (die with its parent, niced)."""
