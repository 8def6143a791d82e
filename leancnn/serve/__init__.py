"""`leancnn serve`: the deadline-aware runtime behind HTTP (Starlette + uvicorn)."""
