"""Suite files: the schema (pydantic), the bounded YAML loader, the checks against the zoo, the
registry and a paper's published table. Nothing here reads data or writes anything.
"""
