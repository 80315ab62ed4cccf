"""A flywheel home's state: its database (pairs, conflicts, splits, versions served), what its
processes share through it, the file store and the ledger of homes made before it, one writer at a time."""
