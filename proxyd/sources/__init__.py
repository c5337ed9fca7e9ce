"""Sources: turn the outside world (manifest files, the API server) into typed objects."""
