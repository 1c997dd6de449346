"""Joule Planner's engine: all the logic behind the app and the CLI. It never imports streamlit."""

__version__ = "0.1.0"
