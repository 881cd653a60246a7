"""UCM's NFS store module path: ucm.store.nfsstore.nfsstore_connector.UcmNfsStore."""
