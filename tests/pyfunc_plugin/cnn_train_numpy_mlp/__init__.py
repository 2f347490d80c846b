"""The dense network in plain NumPy: a cnn-train backend for a framework MLflow has no flavor for.

Nothing is imported here: MLflow imports this package (shipped with the model as code) to load the
logged model, and that must work where cnn-train is not installed. The backend is in ``.backend``.
"""
