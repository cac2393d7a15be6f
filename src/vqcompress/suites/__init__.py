"""Quality suites: task metrics that say how much a compressed model has lost against its original."""
