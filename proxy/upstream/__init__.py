"""The provider hop: router (failover, breaker), forwarder, headers, SSE splitting, the HTTP client and its connector."""
