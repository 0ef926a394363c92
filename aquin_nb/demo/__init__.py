"""The embedded tiny model zoo and the demo that runs on it."""
