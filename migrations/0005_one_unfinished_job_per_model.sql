-- At most one queued or running job per model name, across every server sharing the
-- database (a server checks its own jobs first; replicas only meet here). Duplicates a
-- race may have left are ended first, keeping the newest of each name.
UPDATE training_jobs SET status = 'failed',
    message = 'interrupted: another job for the same model was queued',
    finished_at = created_at
WHERE status IN ('queued', 'running')
  AND id NOT IN (SELECT MAX(id) FROM training_jobs WHERE status IN ('queued', 'running') GROUP BY model);
CREATE UNIQUE INDEX IF NOT EXISTS training_jobs_one_unfinished_per_model
    ON training_jobs (model) WHERE status IN ('queued', 'running');
