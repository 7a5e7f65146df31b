-- The weight a request gave the first of a model's two learned maps (`?alpha=`, usad),
-- so a re-rendered map is the one that made the verdict. NULL: the model's own.
ALTER TABLE inspections ADD COLUMN alpha DOUBLE PRECISION;
