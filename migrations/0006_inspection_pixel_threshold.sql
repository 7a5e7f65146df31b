-- The pixel threshold the verdict's regions were cut at (the model's, or the request's
-- image threshold when that is lower), so a stored record answers as the live one did.
-- NULL: recorded before this column existed.
ALTER TABLE inspections ADD COLUMN pixel_threshold DOUBLE PRECISION;
