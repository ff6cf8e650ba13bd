"""Agent-side telemetry: monitoring windows, the durable outbox and the MQTT link."""
