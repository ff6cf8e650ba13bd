"""Model updates on the device: resumable verified downloads, staging, activation, health checks."""
