-- What a verdict's maps depend on (the weights' hash, architecture, input and scoring),
-- not its thresholds: after a recalibration the model version changes but an earlier
-- inspection's heatmap, map and reconstruction are drawn the same, so they stay
-- available. NULL: recorded before this column, or by a model whose card does not record
-- its weights' hash; such records need the very model version.
ALTER TABLE inspections ADD COLUMN maps_version TEXT;
