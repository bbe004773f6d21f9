"""fixative: protects artwork from Stable Diffusion style mimicry.

The code lives in two folders beside this one, installed under this namespace
(pyproject.toml's package-dir): daemon/ as fixative.daemon (everything but the
math) and engine/ as fixative.engine (the math). A top-level `daemon` package
would clash with python-daemon's import name in a shared environment.
"""
