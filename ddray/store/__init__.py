"""Files that outlive a process, on any storage: storage URIs and the one atomic write
(:mod:`~ddray.store.storage`), run checkpoints (:mod:`~ddray.store.checkpoint`) and the open
distilled-data format (:mod:`~ddray.store.artifact`)."""
