"""What every service shares: bootstrap, config, identity, policy, interceptors, database and Redis access."""
