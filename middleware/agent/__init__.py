from middleware.agent.unit import AgentUnit

__all__ = ["AgentUnit"]
