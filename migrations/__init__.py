"""Alembic's environment (``env.py``) and the schema revisions (``versions/``), shipped with the package.

A package so that ``store.engine`` finds it wherever the project is installed.
"""
