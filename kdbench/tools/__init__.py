"""Commands off the main path (speed measurements).
"""
