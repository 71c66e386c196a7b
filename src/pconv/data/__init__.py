"""Images in: folders and their labels (folders), data configs (config), calibration batches (batches)."""
