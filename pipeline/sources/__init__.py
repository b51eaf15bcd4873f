"""Stream readers: cameras, URLs and files decoded into frames, one reader thread per stream."""
