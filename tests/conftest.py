pytest_plugins = ["tests.support.mesh", "tests.support.infra", "tests.support.accounts"]
