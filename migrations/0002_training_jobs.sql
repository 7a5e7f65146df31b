-- Training jobs started through the server (the operator's page or the API).
CREATE TABLE IF NOT EXISTS training_jobs (
    id TEXT PRIMARY KEY,               -- UUIDv7
    model TEXT NOT NULL,               -- the name the trained model is served under
    status TEXT NOT NULL,              -- queued | running | succeeded | failed | cancelled
    message TEXT,                      -- why it failed, or what it wrote
    options TEXT NOT NULL,             -- JSON: the `vigil train` flags
    data TEXT NOT NULL,                -- the folder of good images
    created_at BIGINT NOT NULL,        -- Unix time, microseconds
    finished_at BIGINT
);
CREATE INDEX IF NOT EXISTS training_jobs_created_at ON training_jobs (created_at);
