"""Publishing: result messages, the Kafka client and its child process, the spool, snapshots."""
