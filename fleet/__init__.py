"""The fleet service: device registry, telemetry ingestion, desired state, rollouts and
experiments over MQTT, with SQLite or PostgreSQL as the store."""
