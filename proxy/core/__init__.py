"""The server core: Call/Reply, errors, the unit pipeline, the gateway's shared services, streams, settings, logs, metrics."""
