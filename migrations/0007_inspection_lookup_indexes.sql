-- Lookups an integration makes: the record of a request it sent (by its X-Request-Id,
-- after a timeout, before retrying) and the records of one part.
CREATE INDEX IF NOT EXISTS inspections_request_id ON inspections (request_id);
CREATE INDEX IF NOT EXISTS inspections_part_id ON inspections (part_id);
