"""Serving: the FastAPI app and the Gradio playground."""
