"""The served model: the holder and the one install path by which a version becomes it (the swap),
request batching, prior correction, the generalist and the drift watch."""
