-- Retries without second records: a request sent with an Idempotency-Key gets the answer
-- of the first request to its model with that key (its record) instead of being judged
-- again. The fingerprint (image digest, part id, threshold and alpha overrides) tells a
-- retry from another request that reuses the key. The warnings of a verdict are kept so
-- that a replayed answer, and the record's page, say what the first answer said.
-- The index is partial: rows without a key (all existing ones, most new ones) are not in
-- it, so it stays small; building it still reads the table once.
ALTER TABLE inspections ADD COLUMN idempotency_key TEXT;
ALTER TABLE inspections ADD COLUMN request_fingerprint TEXT;
ALTER TABLE inspections ADD COLUMN warnings TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS inspections_idempotency_key
    ON inspections (model, idempotency_key) WHERE idempotency_key IS NOT NULL;
