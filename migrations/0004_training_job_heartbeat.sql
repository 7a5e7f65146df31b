-- When the process that queued or runs a job last said it is alive (Unix time, µs).
-- Replicas sharing one database interrupt only jobs whose process has gone quiet, not
-- the jobs another live replica is training. NULL (rows from before): created_at counts.
ALTER TABLE training_jobs ADD COLUMN heartbeat_at BIGINT;
