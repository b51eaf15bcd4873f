"""The frame hub: bounded per-stream buffers and the batcher that takes from them fairly."""
