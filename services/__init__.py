"""The platform's services, one package each, and the runtime they share (services/runtime)."""
