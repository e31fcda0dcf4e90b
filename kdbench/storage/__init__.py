"""Files on disk: atomic writes and hashes (files), the model store (store), job claims (claims).
"""
