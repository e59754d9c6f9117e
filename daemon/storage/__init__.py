"""What the daemon keeps on disk: the SQLite sample buffer and the versioned model store."""
