"""Running a plan: one job's life (job), what a worker process keeps (context), the models a job
builds (build), and where jobs run (executors).
"""
