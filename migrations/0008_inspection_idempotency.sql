-- Retries without second records: a request sent with an Idempotency-Key gets the answer
-- of the first request with that key (its record) instead of being judged again. The
-- fingerprint (model, image digest, part id, threshold and alpha overrides) tells a retry
-- from another request that reuses the key. The warnings of a verdict are kept so that a
-- replayed answer, and the record's page, say what the first answer said.
-- The new columns are NULL in existing rows, so the unique index builds without a scan
-- that could fail; NULLs never collide in SQLite or PostgreSQL.
ALTER TABLE inspections ADD COLUMN idempotency_key TEXT;
ALTER TABLE inspections ADD COLUMN request_fingerprint TEXT;
ALTER TABLE inspections ADD COLUMN warnings TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS inspections_idempotency_key ON inspections (idempotency_key);
