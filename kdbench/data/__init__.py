"""Datasets: the one table of dataset facts (spec), reading them from disk (load), and device-resident
splits with batch augmentation (batches).
"""
