"""Training: the one loop (engine), how loss terms combine (combine), shared teacher outputs
(teacher_cache). Knows nothing of MLflow, executors or plans.
"""
