"""The protection math: an image and options in, a protected image and a report out.

This package knows nothing of queues, folders or databases. Importing it is
cheap: torch is imported only by the modules that need it (``fixative.engine.model``,
``fixative.engine.protect``, ``fixative.engine.attacks``), so the watcher can read
``fixative.engine.options`` without pulling torch in.
"""
