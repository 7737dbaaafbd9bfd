"""One router per resource: health, models, datasets, jobs."""
