"""The NATS JetStream bus (``[bus] url``): event envelopes and subjects, a publisher that never blocks the
pipeline, the distributed backfill's work queue, the upstream stream lease and the shared rate limit.

Imports ``core`` only; ``service/`` decides what goes on it and what comes off it."""
