"""Real stream servers (RTSP, MJPEG) and their pytest fixtures, for the stream-reader tests."""
