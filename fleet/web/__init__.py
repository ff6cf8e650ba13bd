"""The fleet's HTTP side: artifact endpoint (with Range), API, dashboard, metrics."""
