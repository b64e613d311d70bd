pytest_plugins = ["lake_fixtures"]
