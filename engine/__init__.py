"""The protection math: an image and options in, a protected image and a report out.

This package knows nothing of queues, folders or databases. Importing it is
cheap: torch is imported only by the modules that need it (``engine.model``,
``engine.protect``, ``engine.attacks``), so the watcher can read
``engine.options`` without pulling torch in.
"""
