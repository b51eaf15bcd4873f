"""vap: real-time video analytics from cameras to Kafka, with Prometheus metrics."""

__version__ = "0.1.0"
