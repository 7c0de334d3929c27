"""FastAPI routes, schemas, dependencies and error mapping (torch-free)."""
