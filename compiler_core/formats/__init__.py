"""On-disk formats: checkpoint and engine directories, safe JSON and atomic output directories."""
