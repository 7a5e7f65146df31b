-- Portable between SQLite and PostgreSQL: TEXT, BIGINT and DOUBLE PRECISION only.
CREATE TABLE IF NOT EXISTS inspections (
    id TEXT PRIMARY KEY,               -- UUIDv7: time-ordered, so ORDER BY id is ORDER BY time
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    created_at BIGINT NOT NULL,        -- Unix time, microseconds
    score DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    verdict TEXT NOT NULL,             -- 'anomalous' | 'normal'
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    regions TEXT NOT NULL,             -- JSON array
    timings TEXT NOT NULL,             -- JSON object, milliseconds
    image_sha256 TEXT NOT NULL,
    image_path TEXT,                   -- relative to the data directory; NULL when not stored
    request_id TEXT,
    part_id TEXT
);
CREATE INDEX IF NOT EXISTS inspections_model_id ON inspections (model, id);
CREATE INDEX IF NOT EXISTS inspections_created_at ON inspections (created_at);

CREATE TABLE IF NOT EXISTS feedback (
    inspection_id TEXT PRIMARY KEY REFERENCES inspections (id) ON DELETE CASCADE,
    label TEXT NOT NULL,               -- 'good' | 'defective'
    note TEXT,
    created_at BIGINT NOT NULL
);
