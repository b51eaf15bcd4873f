"""Analytics: per-stream tracking, zones and lines, run as a stage of its own."""
