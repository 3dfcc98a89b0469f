"""Development tools: the simulated provider and the demo."""
