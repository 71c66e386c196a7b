"""Observing the ANN: where its activation sites are (sites), what they output on calibration images (record),
and the thresholds that follows (thresholds)."""
